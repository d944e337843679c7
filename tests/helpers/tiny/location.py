"""MVRL/ecogeo: GeoCLIP location encoder layout (config.json + model.safetensors), tiny MLP."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.helpers.tiny import write_json

SIGMAS = [1, 16, 256]


def state_dict(seed: int = 0, encoded: int = 16, hidden: int = 32, dim: int = 512) -> dict:
    """Same keys as the released checkpoint: LocEnc<i>.capsule.{0.b,1,3,5}.*, LocEnc<i>.head.0.*"""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, sigma in enumerate(SIGMAS):
        p = f"LocEnc{i}."
        state[p + "capsule.0.b"] = torch.randn(encoded, 2, generator=g) * sigma
        sizes = [2 * encoded, hidden, hidden, hidden]
        for j, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            state[f"{p}capsule.{1 + 2 * j}.weight"] = torch.randn(b, a, generator=g) / a**0.5
            state[f"{p}capsule.{1 + 2 * j}.bias"] = torch.randn(b, generator=g) * 0.1
        state[p + "head.0.weight"] = torch.randn(dim, hidden, generator=g) / hidden**0.5
        state[p + "head.0.bias"] = torch.randn(dim, generator=g) * 0.1
    return state


def write(folder: Path, seed: int = 0) -> None:
    write_json(folder / "config.json", {"dim": 512, "encoded_size": 16, "input_size": 2, "sigma": SIGMAS})
    save_file(state_dict(seed), str(folder / "model.safetensors"))
