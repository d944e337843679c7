"""Independent re-computations (plain numpy / the upstream library) used to check taxamap's maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

A1, A2, A3, A4, SF = 1.340264, -0.081106, 0.000893, 0.003796, 66.50336


def location_embeddings(weights: Path, latlon: np.ndarray) -> np.ndarray:
    """GeoCLIP's forward pass in float64 numpy from a safetensors file; rows L2-normalised."""
    from safetensors.numpy import load_file

    w = {k: v.astype(np.float64) for k, v in load_file(str(weights)).items()}
    lat, lon = np.deg2rad(latlon[:, 0]), np.deg2rad(latlon[:, 1])
    theta = np.arcsin(np.sqrt(3) / 2 * np.sin(lat))
    x = 2 * np.sqrt(3) * lon * np.cos(theta) / (
        3 * (9 * A4 * theta**8 + 7 * A3 * theta**6 + 3 * A2 * theta**2 + A1))
    y = A4 * theta**9 + A3 * theta**7 + A2 * theta**3 + A1 * theta
    v = np.stack([x, y], axis=1) * SF / 180
    total = 0.0
    i = 0
    while f"LocEnc{i}.capsule.0.b" in w:
        p = f"LocEnc{i}."
        h = 2 * np.pi * v @ w[p + "capsule.0.b"].T
        h = np.concatenate([np.cos(h), np.sin(h)], axis=1)
        j = 1
        while f"{p}capsule.{j}.weight" in w:
            h = np.maximum(h @ w[f"{p}capsule.{j}.weight"].T + w[f"{p}capsule.{j}.bias"], 0)
            j += 2
        total = total + h @ w[p + "head.0.weight"].T + w[p + "head.0.bias"]
        i += 1
    return total / np.linalg.norm(total, axis=1, keepdims=True)


def clip_text_embedding(repo_dir: Path, prompt: str) -> np.ndarray:
    """The prompt's embedding straight from open_clip and the safetensors file."""
    import json

    import open_clip
    import torch
    from safetensors.torch import load_file

    cfg = json.loads((Path(repo_dir) / "open_clip_config.json").read_text())["model_cfg"]
    model = open_clip.model.CLIP(**cfg)
    model.load_state_dict(load_file(str(Path(repo_dir) / "open_clip_model.safetensors")), strict=False)
    model.eval()
    tokens = open_clip.tokenize([prompt], context_length=cfg["text_cfg"]["context_length"])
    with torch.no_grad():
        e = model.encode_text(tokens).double().numpy()[0]
    return e / np.linalg.norm(e)
