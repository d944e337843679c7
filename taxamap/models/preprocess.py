"""Image reading and the preprocessing TaxaBind trained with (ground photos and satellite tiles).

Training used torchvision's ImageNet pipeline: ``Resize((resize, resize))`` (a squash, not an
aspect-preserving resize) -> ``CenterCrop(crop)`` -> ``ToTensor`` -> ``Normalize(mean, std)`` with
ImageNet statistics. open_clip's own ``preprocess`` for the released repo uses OpenAI statistics and
an aspect-preserving resize; using it would feed the model inputs it never saw, so every encoder in
taxamap goes through :func:`build_transform` instead. Sizes and statistics come from the TaxaBind
entry config (``image_resize``/``image_crop`` for photos, ``sat_resize``/``sat_crop`` for tiles).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from taxamap.errors import TaxamapError
from taxamap.surface import option

#: File types ``--image`` accepts (what Pillow decodes here; checked by the tests).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

#: Most pixels a photo is decoded at. Every photo is squashed to 224 x 224 pixels anyway; 40 Mpx
#: passes every common camera (24-61 Mpx full frame bodies are decoded whole or, as JPEGs, at half
#: size) and bounds one decode at ~0.5 GB. The size is read from the file's header before any
#: pixel is decoded: a small PNG declaring 12000 x 12000 pixels costs nothing to refuse. JPEGs
#: above it are decoded at 1/2, 1/4 or 1/8 size by libjpeg (Pillow's ``draft``) when that
#: brings them under it.
MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class PreprocessSpec:
    """The numbers of one preprocessing pipeline."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def spec_from_config(config: dict, kind: str = "image") -> PreprocessSpec:
    """Read the preprocessing numbers for ``kind`` ("image" or "sat") from a TaxaBind config.

    Missing keys fall back to the published values (see ``hub.DEFAULT_CONFIG``).
    """
    from taxamap.models.hub import DEFAULT_CONFIG

    if kind not in ("image", "sat"):
        raise ValueError(f"kind must be 'image' or 'sat', not {kind!r}")

    def get(key):
        value = config.get(key)
        return DEFAULT_CONFIG[key] if value is None else value

    try:
        spec = PreprocessSpec(
            resize=int(get(f"{kind}_resize")),
            crop=int(get(f"{kind}_crop")),
            mean=tuple(float(v) for v in get("normalize_mean")),
            std=tuple(float(v) for v in get("normalize_std")),
        )
    except (TypeError, ValueError) as exc:
        raise TaxamapError(f"bad preprocessing values in the TaxaBind config: {exc}") from exc
    if len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0:
        raise TaxamapError("TaxaBind config normalize_mean/normalize_std must be 3 numbers each (std > 0)")
    if not 0 < spec.crop <= spec.resize:
        raise TaxamapError(
            f"TaxaBind config crop ({spec.crop}) must be positive and no larger than resize ({spec.resize})"
        )
    return spec


def build_transform(spec: PreprocessSpec) -> Callable:
    """PIL image -> float tensor (3, crop, crop), exactly as in training."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize((spec.resize, spec.resize)),
            transforms.CenterCrop(spec.crop),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )


def to_rgb(image):
    """An RGB copy of ``image``; transparent pixels are composited onto white.

    Dropping alpha would expose whatever colour hides under transparent pixels (often black);
    white matches how such images are displayed.
    """
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: Pillow's RGB conversion clips, so rescale to 8 bits first.
        import numpy as np

        arr = np.array(image, dtype=np.float64)
        hi = arr.max() if arr.size else 0
        if hi > 255:
            arr *= 255.0 / 65535.0  # in place: a 40 Mpx float64 copy is 320 MB
        image = Image.fromarray(np.clip(arr, 0, 255, out=arr).astype("uint8"), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS):
    """Read a photo (JPEG, PNG, WebP) as an RGB PIL image, EXIF orientation applied.

    At most ``max_pixels`` are decoded (see :data:`MAX_PIXELS`): the size comes from the header;
    a larger JPEG is decoded reduced by libjpeg when 1/2, 1/4 or 1/8 of its size fits, any other
    larger photo is refused before decoding. A missing, unreadable, corrupt or oversized file
    raises a one-line :class:`TaxamapError`.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.exists():
        raise TaxamapError(f"image not found: {path}; check the path given to {option('image')}")
    if not path.is_file():
        raise TaxamapError(f"{option('image')} must be a file, but {path} is not")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning starts at 89 Mpx; MAX_PIXELS is the bound enforced here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                _fit_pixels(opened, path, max_pixels)
                opened.load()  # decode now, so truncated files fail here and not later
                ImageOps.exif_transpose(opened, in_place=True)  # no second full-size copy
                image = to_rgb(opened)
                image.load()
    except UnidentifiedImageError as exc:
        raise TaxamapError(
            f"cannot read image {path}: not a JPEG, PNG or WebP file Pillow can decode"
        ) from exc
    except Image.DecompressionBombError as exc:  # over Pillow's hard limit (179 Mpx)
        raise TaxamapError(_too_many_pixels(path, None, max_pixels)) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TaxamapError(f"cannot read image {path}: corrupt or truncated ({detail})") from exc
    if image.width < 1 or image.height < 1:
        raise TaxamapError(f"image {path} is empty (0 pixels)")
    return image


def _fit_pixels(opened, path: Path, max_pixels: int) -> None:
    """Make an opened (not yet decoded) image decode at most ``max_pixels``: reduced by the
    decoder where the format allows it (JPEG), else TaxamapError."""
    width, height = opened.size
    if width * height <= max_pixels:
        return
    for scale in (2, 4, 8):
        if -(-width // scale) * -(-height // scale) <= max_pixels:
            opened.draft(None, (max(1, width // scale), max(1, height // scale)))
            break
    if opened.size[0] * opened.size[1] > max_pixels:  # draft is a no-op for PNG, WebP, ...
        raise TaxamapError(_too_many_pixels(path, (width, height), max_pixels))


def _too_many_pixels(path: Path, size: tuple[int, int] | None, max_pixels: int) -> str:
    shown = (f"{size[0]:,} x {size[1]:,} pixels ({size[0] * size[1] / 1e6:,.0f} Mpx)"
             if size else "more than 179 Mpx")
    return (f"image {path} is {shown}; taxamap decodes photos of up to {max_pixels / 1e6:g} Mpx "
            "(the model sees 224 x 224): shrink it, e.g. to 4000 pixels on its long side")


def preprocess_batch(images: Sequence, transform: Callable):
    """Stack preprocessed images into one float tensor (N, 3, crop, crop).

    Accepts PIL images; non-RGB modes are converted with :func:`to_rgb`.
    """
    import torch
    from PIL import Image

    tensors = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TaxamapError(
                f"image {i} is a {type(image).__name__}, expected a PIL image (use load_image)"
            )
        tensors.append(transform(to_rgb(image)))
    if not tensors:
        raise ValueError("preprocess_batch needs at least one image")
    return torch.stack(tensors)


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
    """Text prompts as a list (one string is one prompt); TaxamapError on an empty or non-string
    prompt, so every text backend refuses the same input the same way."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise TaxamapError(f"text prompt must be a non-empty string, got {p!r}")
    return prompts
