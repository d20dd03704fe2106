"""tether: RL fine-tuning of language models against a reward, tethered to a frozen reference by a KL penalty."""

import os

# OpenMP worker threads that spin without bound while they wait collapse when another process shares the cores;
# threads that sleep at once (OMP_WAIT_POLICY=PASSIVE) are slow when the cores are free. A bounded spin keeps
# both: one decoding step on 2 cores took 18 ms free / 77 ms beside another job spinning without bound, 26 / 65
# ms passive, 18 / 46 ms with GOMP_SPINCOUNT=10000 (bench/threads.py, bench/README.md "Threads"). libgomp (torch's
# OpenMP on Linux) reads it when torch starts, so it is set here, before anything imports torch; nothing is
# changed when the user set either variable.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


from tether.config import ConfigError, KLConfig, LoggingConfig, RLConfig
from tether.sampling import KLBiasError, SamplingConfig
from tether.trainers.grpo import GRPOConfig, GRPOTrainer
from tether.trainers.ppo import PPOConfig, PPOTrainer
from tether.trainers.reward import RewardConfig, RewardTrainer

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "GRPOConfig",
    "GRPOTrainer",
    "KLBiasError",
    "KLConfig",
    "LoggingConfig",
    "PPOConfig",
    "PPOTrainer",
    "RLConfig",
    "RewardConfig",
    "RewardTrainer",
    "SamplingConfig",
    "__version__",
]
