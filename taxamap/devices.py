"""Choosing the torch device and CPU thread settings."""

from __future__ import annotations

import os

from taxamap.errors import TaxamapError
from taxamap.surface import option

DEVICES = ("auto", "cpu", "cuda")


def pick_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without one is an error."""
    import torch

    device = (device or "auto").lower()
    if device not in DEVICES and not device.startswith("cuda:"):
        raise TaxamapError(f"unknown {option('device', device)}; choose auto, cpu or cuda")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TaxamapError(f"{option('device', 'cuda')} was asked for but no CUDA GPU is visible; "
                           f"use {option('device', 'cpu')}")
    if device == "cpu":
        # One intra-op thread per (logical) core, or TAXAMAP_THREADS.
        raw = os.environ.get("TAXAMAP_THREADS", "0")
        try:
            wanted = int(raw) or (os.cpu_count() or 1)
        except ValueError as exc:
            raise TaxamapError(f"TAXAMAP_THREADS={raw!r} is not a whole number") from exc
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
    return device


def lazy_device(device: str = "auto"):
    """A callable that resolves ``device`` with :func:`pick_device` on first use and remembers it.

    Importing torch costs about a second; a warm query whose cells are stored never needs it. A
    bad name is still reported up front.
    """
    name = (device or "auto").lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise TaxamapError(f"unknown {option('device', device)}; choose auto, cpu or cuda")
    chosen: list[str] = []

    def get() -> str:
        if not chosen:
            chosen.append(pick_device(name))
        return chosen[0]

    return get
