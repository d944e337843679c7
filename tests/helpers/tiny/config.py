"""MVRL/taxabind-config: the entry config, as published."""

from __future__ import annotations

from pathlib import Path

from taxamap.models.hub import DEFAULT_CONFIG
from tests.helpers.tiny import write_json


def write(folder: Path, seed: int = 0) -> None:
    config = {k: v for k, v in DEFAULT_CONFIG.items() if k != "audio_processor"}
    write_json(folder / "config.json", config)
