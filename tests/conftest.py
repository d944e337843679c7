"""Test isolation: no network, no user caches, tiny models in the released layouts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports huggingface_hub: never reach the Hub, never read the user's caches.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TAXAMAP_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.pop("TAXAMAP_MODELS", None)
os.environ["MPLBACKEND"] = "Agg"


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    base = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("TAXAMAP_CACHE", str(base / "taxamap"))
    monkeypatch.setenv("HF_HOME", str(base / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("TAXAMAP_MODELS", raising=False)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models folder (``--models DIR`` layout) holding every tiny repo written so far."""
    from tests.helpers.tiny import write_models_dir

    return write_models_dir(tmp_path_factory.mktemp("models"))
