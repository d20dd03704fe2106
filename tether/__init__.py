"""tether: RL fine-tuning of language models against a reward, tethered to a frozen reference by a KL penalty."""

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
