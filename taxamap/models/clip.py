"""TaxaBind's image+text encoder (``MVRL/taxabind-vit-b-16``, an open_clip ViT-B/16).

The architecture is built by open_clip from the repo's own ``open_clip_config.json`` (so a small
model in the same layout loads through the same code) with weight loading switched off; the
weights are then read by :func:`taxamap.models.hub.load_weights` (safetensors, or ``torch.load``
with ``weights_only=True``; subnormals flushed) and loaded strictly. Nothing here downloads: files
come from :func:`taxamap.models.hub.resolve`.

Images go through TaxaBind's training preprocessing (ImageNet statistics, 256 squash -> 224 crop;
:mod:`taxamap.models.preprocess`), not open_clip's default transform for the repo. Text prompts are
the plain seven-rank taxonomic string, e.g.
``"Animalia Chordata Aves Passeriformes Cardinalidae Cardinalis cardinalis"``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.models import hub
from taxamap.models.autocast import autocast, normalize_rows, resolve_device, resolve_dtype
from taxamap.models.preprocess import (build_transform, check_prompts, preprocess_batch,
                                       spec_from_config)

#: The TaxaBind config key naming the CLIP repo (image and text towers).
CONFIG_KEY = "clip"

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(eq=False, repr=False)
class ClipEncoder:
    """Text and image embeddings in TaxaBind's shared space (float32, unit-norm rows)."""

    model: Any
    tokenizer: Any
    transform: Any
    ref: str
    device: Any
    dtype: Any = None
    embed_dim: int = 512
    batch_size: int = 64

    def __repr__(self) -> str:
        return f"ClipEncoder({self.ref}, device={self.device}, dtype={self.dtype or 'float32'})"

    def preprocess(self, images: Sequence):
        """PIL images -> float tensor (N, 3, crop, crop) with the training preprocessing."""
        return preprocess_batch(images, self.transform)

    def encode_text(self, prompts: Sequence[str]) -> np.ndarray:
        """Embed prompts (plain seven-rank strings) -> float32 (N, embed_dim), unit-norm rows."""
        prompts = check_prompts(prompts)
        if not prompts:
            return np.zeros((0, self.embed_dim), np.float32)
        import torch

        out = []
        with torch.inference_mode(), autocast(self.device, self.dtype):
            for start in range(0, len(prompts), self.batch_size):
                tokens = self.tokenizer(prompts[start:start + self.batch_size]).to(self.device)
                feats = self.model.encode_text(tokens, normalize=True)
                out.append(feats.float().cpu().numpy())
        return normalize_rows(np.concatenate(out))

    def encode_image(self, images: Sequence) -> np.ndarray:
        """Embed PIL images -> float32 (N, embed_dim), unit-norm rows."""
        images = list(images)
        if not images:
            return np.zeros((0, self.embed_dim), np.float32)
        out = []
        for start in range(0, len(images), self.batch_size):
            out.append(self.encode_pixels(self.preprocess(images[start:start + self.batch_size])))
        return np.concatenate(out)

    def encode_pixels(self, pixels) -> np.ndarray:
        """Embed an already preprocessed tensor (N, 3, crop, crop) -> float32 unit-norm rows."""
        import torch

        with torch.inference_mode(), autocast(self.device, self.dtype):
            feats = self.model.encode_image(pixels.to(self.device), normalize=True)
        return normalize_rows(feats.float().cpu().numpy())


def _image_size(vision_cfg: dict) -> int | None:
    size = vision_cfg.get("image_size")
    if isinstance(size, (list, tuple)):
        return int(size[0]) if len(set(size)) == 1 else None
    return int(size) if size is not None else None


def _build_model(folder: Path):
    """The open_clip architecture described by ``folder/open_clip_config.json``, random weights."""
    import open_clip

    root = logging.getLogger()
    quiet = _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        return open_clip.create_model(
            f"local-dir:{folder}",
            load_weights=False,  # weights go through hub.load_weights instead
            pretrained_image=False,
            pretrained_text=False,
            device="cpu",
        )
    except Exception as exc:  # open_clip raises ValueError/RuntimeError/KeyError/TypeError here
        raise TaxamapError(
            f"cannot build the open_clip model from {folder / CONFIG_FILE}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        root.removeFilter(quiet)


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns on the root logger that the model is "initialized randomly" when built
    without weights; here the weights are loaded right after, so that warning would mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("initialized randomly" in msg or "no CLIP weights found" in msg)


def _fit_state(model, state: dict) -> dict:
    """Bridge harmless differences between how checkpoints were saved and this open_clip."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    for key in ("logit_scale", "logit_bias"):
        if key in state and key in own and state[key].shape != own[key].shape:
            state[key] = state[key].reshape(own[key].shape)
    # Older transformers text towers saved this buffer; current ones rebuild it.
    state.pop("text.transformer.embeddings.position_ids", None)
    return state


def load_clip(
    models_dir: str | os.PathLike | None = None,
    device="cpu",
    config: dict | None = None,
    dtype=None,
    batch_size: int = 64,
) -> ClipEncoder:
    """Load TaxaBind's image+text encoder.

    ``models_dir``: a models folder (else ``TAXAMAP_MODELS``, else the Hugging Face cache);
    ``config``: the TaxaBind entry config (``hub.load_config``; read when None), which names the repo
    and gives the preprocessing; ``device``: "cpu", "cuda", "auto"; ``dtype``: autocast dtype on CUDA
    (None = bf16 when supported); CPU always runs float32.
    """
    if config is None:
        config, _ = hub.load_config(models_dir)
    repo_id = hub.encoder_repo(config, CONFIG_KEY)
    repo = hub.resolve(repo_id, [CONFIG_FILE, WEIGHT_FILES], models_dir=models_dir)
    config_path = repo.file(CONFIG_FILE)
    weights_path = repo.file(WEIGHT_FILES[0])
    raw = hub.read_json(config_path)
    model_cfg = raw.get("model_cfg")
    if not isinstance(model_cfg, dict) or "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
        raise TaxamapError(f"{config_path} has no model_cfg with vision_cfg and text_cfg; not an open_clip repo")
    if "hf_model_name" in model_cfg["text_cfg"] or "hf_tokenizer_name" in model_cfg["text_cfg"]:
        raise TaxamapError(f"{config_path} uses a Hugging Face text tower, which taxamap does not load")

    spec = spec_from_config(config, "image")
    size = _image_size(model_cfg["vision_cfg"])
    if size is not None and size != spec.crop:
        raise TaxamapError(
            f"{repo_id} expects {size}px images but the TaxaBind config crops to {spec.crop}px; "
            "the config and the model do not belong together"
        )

    folder = config_path.parent
    model = _build_model(folder)
    state = hub.load_weights(weights_path)
    state = _fit_state(model, state)
    hub.check_state(model.state_dict(), state, weights_path, config_name=CONFIG_FILE)
    model.load_state_dict(state, strict=True)
    del state

    import open_clip

    context_length = int(model_cfg["text_cfg"].get("context_length", 77))
    try:
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}", context_length=context_length)
    except Exception as exc:
        raise TaxamapError(f"cannot build the tokenizer for {repo_id}: {exc}") from exc

    dev = resolve_device(device)
    model = model.to(dev).eval()
    return ClipEncoder(
        model=model,
        tokenizer=tokenizer,
        transform=build_transform(spec),
        ref=repo.ref,
        device=dev,
        dtype=resolve_dtype(dev, dtype),
        embed_dim=int(model_cfg.get("embed_dim", 512)),
        batch_size=int(batch_size),
    )


#: Conventional loader name (``load_<modality>_encoder``) for the engine/CLI.
load_clip_encoder = load_clip
