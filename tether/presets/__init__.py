"""Packaged presets: YAML files of config fields, one folder per trainer, chosen with ``--preset NAME``.

``tether ppo --preset tiny`` reads ``ppo/tiny.yaml`` (``PPOConfig`` fields), ``tether grpo --preset tiny``
reads ``grpo/tiny.yaml`` (``GRPOConfig`` fields). A preset is the bottom layer; a ``--config`` file goes on top
of it and ``--field value`` on top of both.
"""

from __future__ import annotations

from pathlib import Path

PRESET_DIR = Path(__file__).parent


def preset_names(trainer: str = "ppo") -> list[str]:
    """The names of the packaged presets of ``trainer`` (``tiny``, ``small``, ...)."""
    return sorted(p.stem for p in (PRESET_DIR / trainer).glob("*.yaml"))


def preset_path(name: str, trainer: str = "ppo") -> Path:
    """The YAML file of preset ``name``; an unknown name is an error that lists the known ones."""
    path = PRESET_DIR / trainer / f"{name}.yaml"
    if not path.is_file():
        from tether.config import ConfigError

        raise ConfigError(f"unknown {trainer} preset {name!r}; the presets are: {', '.join(preset_names(trainer))}")
    return path


def preset_summary(name: str, trainer: str = "ppo") -> str:
    """The first comment line of a preset file: what it is for."""
    first = preset_path(name, trainer).read_text().splitlines()[0]
    return first.lstrip("# ").strip()
