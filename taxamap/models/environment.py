"""Environment encoder: TaxaBind's ``MVRL/ecoclim``, SINR's residual fully-connected network.

Input: the 20 scaled climate features of a place (see :mod:`taxamap.sources.worldclim`).
Output: a 512-d embedding in TaxaBind's shared space, L2-normalised here (the network's output is
not). Sizes come from the repo's ``config.json`` (``num_inputs``, ``num_filts``, ``depth``), so a
small model written in the same layout loads through this same code.

Precision (:mod:`taxamap.models.precision`): ``bf16-mixed`` runs the residual blocks' layers in
bf16 and keeps the input layer (20 features, ~0.5 % of the work), the residual sums and the
output in float32.
"""

from __future__ import annotations

import os

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.models.hub import encoder_repo, load_config, load_weights, read_json, resolve
from taxamap.models.precision import cast_layers, check_precision, resolve_precision

#: The TaxaBind config key naming this encoder's repo.
CONFIG_KEY = "env_encoder"

# SINR's checkpoints also carry a species classifier head (``class_emb``); TaxaBind uses the
# features before it.
_IGNORED_PREFIXES = ("class_emb.",)


def _build_network(num_inputs: int, num_filts: int, depth: int, dropout: float = 0.5):
    import torch
    from torch import nn

    class ResidualBlock(nn.Module):
        """x + ReLU(w2(Dropout(ReLU(w1(x))))): parameter names as in SINR's ``ResLayer``."""

        def __init__(self, width: int) -> None:
            super().__init__()
            self.w1 = nn.Linear(width, width)
            self.w2 = nn.Linear(width, width)
            self.dropout = nn.Dropout(dropout)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # The layers run in their weights' dtype (bf16 under bf16-mixed), the residual sum
            # in x's float32 so that rounding does not pile up over the blocks (.to is a no-op
            # under fp32).
            y = torch.relu(self.w1(x.to(self.w1.weight.dtype)))
            y = torch.relu(self.w2(self.dropout(y)))
            return x + y.to(x.dtype)

    class ResidualFCNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.feats = nn.Sequential(
                nn.Linear(num_inputs, num_filts),
                nn.ReLU(),
                *[ResidualBlock(num_filts) for _ in range(depth)],
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.feats(x)

    return ResidualFCNet()


#: The files of the released repo (MVRL/ecoclim).
FILES = ["config.json", "model.safetensors"]

class EnvironmentEncoder:
    """Climate features ``(N, num_inputs)`` -> L2-normalised embeddings ``(N, 512)``."""

    def __init__(self, model, ref: str, device, config: dict, precision: str = "fp32") -> None:
        self.model = model
        self.ref = ref
        #: "fp32" or "bf16-mixed": what the forward pass runs, for store keys and GeoTIFF tags.
        self.precision = precision
        self.device = str(device)
        self.config = config
        self.num_inputs = int(config["num_inputs"])
        self.dim = int(config["num_filts"])

    def encode(self, features: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Embed feature rows; a row holding NaN (no climate data) comes back as a NaN row."""
        import torch

        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.num_inputs:
            raise TaxamapError(
                f"environment encoder expects (N, {self.num_inputs}) climate features, got shape "
                f"{x.shape}; build them with taxamap.sources.worldclim.WorldClimFeatures"
            )
        out = np.full((x.shape[0], self.dim), np.nan, dtype=np.float32)
        valid = ~np.isnan(x).any(axis=1)
        idx = np.flatnonzero(valid)
        with torch.inference_mode():
            for start in range(0, idx.size, batch_size):
                rows = idx[start:start + batch_size]
                batch = torch.from_numpy(x[rows]).to(self.device)
                emb = self.model(batch).float()
                emb = torch.nn.functional.normalize(emb, dim=-1)
                out[rows] = emb.cpu().numpy()
        return out


def load_environment_encoder(
    models_dir: str | os.PathLike | None = None,
    device="cpu",
    config: dict | None = None,
    precision: str = "fp32",
) -> EnvironmentEncoder:
    """Load the environment encoder named by the TaxaBind config (default ``MVRL/ecoclim``).

    ``config`` is the TaxaBind entry config (from :func:`taxamap.models.hub.load_config`); it is
    read from ``models_dir``/the Hub when not given. ``precision``: "fp32", "bf16-mixed" or
    "auto" (bf16-mixed where the hardware runs bf16 natively, see
    :mod:`taxamap.models.precision`); the encoder's ``precision`` says which ran.
    """
    check_precision(precision)
    if config is None:
        config, _ = load_config(models_dir)
    repo = resolve(encoder_repo(config, CONFIG_KEY), FILES,
                   models_dir=models_dir)
    net_config = read_json(repo.file("config.json"))
    try:
        sizes = {k: int(net_config[k]) for k in ("num_inputs", "num_filts", "depth")}
    except (KeyError, TypeError, ValueError) as exc:
        raise TaxamapError(
            f"{repo.file('config.json')} lacks a valid {exc} entry; expected num_inputs, "
            "num_filts and depth (SINR ResidualFCNet)"
        ) from exc
    model = _build_network(**sizes)
    state = {
        k: v for k, v in load_weights(repo.file("model.safetensors")).items()
        if not k.startswith(_IGNORED_PREFIXES)
    }
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise TaxamapError(
            f"{repo.file('model.safetensors')} does not match its config.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); re-download {repo.repo_id}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatch between config.json and weights
        first = str(exc).strip().splitlines()[-1].strip()
        raise TaxamapError(
            f"{repo.file('model.safetensors')} does not fit its config.json ({first}); "
            f"re-download {repo.repo_id}"
        ) from exc
    from taxamap.models.autocast import resolve_device

    dev = resolve_device(device)
    model = model.to(dev).eval()  # eval: the residual blocks' dropout must be off
    chosen = resolve_precision(precision, dev)
    cast_layers(list(model.feats)[2:], chosen)  # the blocks; feats.0 takes the raw features
    return EnvironmentEncoder(model, repo.ref, dev, {**net_config, **sizes}, precision=chosen)
