"""tether: RL fine-tuning of language models against a reward, tethered to a frozen reference by a KL penalty."""

import os

# OpenMP worker threads that spin while they wait collapse when another process shares the cores: on a 2-core
# machine with a second job running, one decoding step took 498 ms spinning against 42 ms waiting passively
# (bench/README.md, "Threads"); with the cores free the two are within noise. The setting only takes effect
# before torch starts its OpenMP runtime, so it is made here, before anything imports torch; a value the user
# set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
