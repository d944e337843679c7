"""MVRL/taxabind-vit-b-16: a tiny open_clip CLIP in the released layout.

Same files (``open_clip_config.json`` + ``open_clip_model.safetensors``), same config structure
(``model_cfg`` with ``embed_dim`` 512, ``vision_cfg`` at 224 px, ``text_cfg`` with the real context
length and vocabulary, ``preprocess_cfg`` with OpenAI statistics as the released file has) and the
state-dict keys open_clip produces; only widths and depths are small (~3.5 MB).
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers.tiny import write_json

CONFIG = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    },
}


def write(folder: Path, seed: int = 0) -> None:
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    folder = Path(folder)
    write_json(folder / "open_clip_config.json", CONFIG)
    torch.manual_seed(seed)
    model = CLIP(**CONFIG["model_cfg"])
    # open_clip initialises some projections to small values; spread them so different inputs give
    # clearly different embeddings in the tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.2)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"), metadata={"format": "pt"})
