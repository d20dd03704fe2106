"""Packaged PPO presets: YAML files of ``PPOConfig`` fields, chosen with ``tether ppo --preset NAME``.

A preset is the bottom layer; a ``--config`` file goes on top of it and ``--field value`` on top of both.
"""

from __future__ import annotations

from pathlib import Path

PRESET_DIR = Path(__file__).parent


def preset_names() -> list[str]:
    """The names of the packaged presets (``tiny``, ``small``, ...)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The YAML file of preset ``name``; an unknown name is an error that lists the known ones."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        from tether.config import ConfigError

        raise ConfigError(f"unknown preset {name!r}; the presets are: {', '.join(preset_names())}")
    return path


def preset_summary(name: str) -> str:
    """The first comment line of a preset file: what it is for."""
    first = preset_path(name).read_text().splitlines()[0]
    return first.lstrip("# ").strip()
