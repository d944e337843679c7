"""MVRL/ecosat: a tiny ``CLIPVisionModelWithProjection`` saved exactly as ``save_pretrained`` does.

``config.json`` (model_type ``clip_vision_model``, architectures ``["CLIPVisionModelWithProjection"]``,
224 px input, 512-d projection) + ``model.safetensors`` with the released state-dict keys; the
hidden size and depth are small (~0.5 MB).
"""

from __future__ import annotations

from pathlib import Path

CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=224,
    patch_size=32,
    projection_dim=512,
)


def write(folder: Path, seed: int = 0) -> None:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**CONFIG))
    # Wider weights than the default init so distinct tiles give clearly distinct embeddings.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(folder))
