"""MVRL/ecoclim: SINR ResidualFCNet layout (config.json + model.safetensors), 512-d, shallow."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.helpers.tiny import write_json

CONFIG = {"num_inputs": 20, "num_filts": 512, "depth": 2, "num_classes": 10}


def state_dict(seed: int = 0, num_inputs: int = 20, num_filts: int = 512, depth: int = 2,
               num_classes: int = 10) -> dict:
    """Keys as released: feats.0.*, feats.{2..depth+1}.w{1,2}.*, class_emb.weight (ignored)."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "feats.0.weight": torch.randn(num_filts, num_inputs, generator=g) / num_inputs**0.5,
        "feats.0.bias": torch.randn(num_filts, generator=g) * 0.1,
    }
    for i in range(2, depth + 2):
        for w in ("w1", "w2"):
            state[f"feats.{i}.{w}.weight"] = torch.randn(num_filts, num_filts, generator=g) / num_filts**0.5
            state[f"feats.{i}.{w}.bias"] = torch.randn(num_filts, generator=g) * 0.1
    if num_classes:
        state["class_emb.weight"] = torch.randn(num_classes, num_filts, generator=g)
    return state


def write(folder: Path, seed: int = 0) -> None:
    write_json(folder / "config.json", CONFIG)
    save_file(state_dict(seed, **CONFIG), str(folder / "model.safetensors"))
