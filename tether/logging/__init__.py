"""Run logging: the ``Logger`` protocol and its JSONL, TensorBoard, wandb and console backends.

``build_loggers(report_to, run_dir, config)`` is what a trainer calls; ``metrics.jsonl`` and ``samples.jsonl``
are always written (they feed ``tether report`` and the health checks). TensorBoard and wandb are imported only
when asked for, so ``import tether.logging`` needs neither.
"""

from tether.logging.base import (
    REPORT_TO_CHOICES,
    Logger,
    MultiLogger,
    NullLogger,
    build_loggers,
    samples_markdown,
)
from tether.logging.console import ConsoleLogger
from tether.logging.jsonl import (
    METRICS_FILE,
    SAMPLES_FILE,
    JsonlFormatError,
    JsonlLogger,
    read_jsonl,
)
from tether.logging.progress import Progress

__all__ = [
    "METRICS_FILE",
    "REPORT_TO_CHOICES",
    "SAMPLES_FILE",
    "ConsoleLogger",
    "JsonlFormatError",
    "JsonlLogger",
    "Logger",
    "MultiLogger",
    "NullLogger",
    "Progress",
    "TensorBoardLogger",
    "WandbLogger",
    "build_loggers",
    "read_jsonl",
    "samples_markdown",
]


def __getattr__(name: str) -> object:
    # Lazy: importing TensorBoardLogger pulls in torch.utils.tensorboard; WandbLogger's module is light but is
    # kept symmetric. ``from tether.logging import TensorBoardLogger`` still works.
    if name == "TensorBoardLogger":
        from tether.logging.tensorboard import TensorBoardLogger

        return TensorBoardLogger
    if name == "WandbLogger":
        from tether.logging.wandb import WandbLogger

        return WandbLogger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
