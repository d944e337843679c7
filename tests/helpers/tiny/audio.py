"""MVRL/ecosound: a tiny ``ClapAudioModelWithProjection`` saved exactly as ``save_pretrained`` does.

``config.json`` (model_type ``clap_audio_model``, architectures ``["ClapAudioModelWithProjection"]``,
``enable_fusion`` true as in laion/clap-htsat-fused, 512-d projection) + ``model.safetensors`` with
the released state-dict keys (``audio_model.audio_encoder.*``, ``audio_projection.*``).

What must stay as released so the real feature extractor's output fits: ``spec_size`` 256 and
``num_mel_bins`` 64 (the 1001 x 64 mel is folded into a 256 x 256 image, freq_ratio 4). The HTSAT is
shrunk elsewhere: two Swin stages of one block, 8 x 8 patches, 16 channels (~0.3 M parameters,
well under a second per clip on CPU).
"""

from __future__ import annotations

from pathlib import Path

CONFIG = dict(
    spec_size=256,
    num_mel_bins=64,
    patch_size=8,
    patch_stride=[8, 8],
    window_size=8,
    patch_embeds_hidden_size=16,
    depths=[1, 1],
    num_attention_heads=[1, 2],
    # The encoder's output width is patch_embeds_hidden_size * 2 ** (stages - 1).
    hidden_size=32,
    projection_dim=512,
    enable_fusion=True,
    fusion_type=None,
)


def write(folder: Path, seed: int = 0) -> None:
    import torch
    from transformers import ClapAudioConfig, ClapAudioModelWithProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = ClapAudioModelWithProjection(ClapAudioConfig(**CONFIG))
    model.save_pretrained(str(folder))
