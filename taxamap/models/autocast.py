"""Device and precision choices shared by the vision encoders (CLIP image/text, satellite).

CPU always runs float32 (bf16 on CPU is slower here and changes results). On CUDA the forward pass
runs under autocast, bf16 when the GPU supports it, else fp16; embeddings are returned float32 and
renormalised in float32 either way.
"""

from __future__ import annotations

import contextlib
import logging

from taxamap.errors import TaxamapError
from taxamap.surface import option

log = logging.getLogger(__name__)

_DTYPES = {"float32": None, "fp32": None, "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def resolve_device(device=None):
    """``"auto"``/None -> CUDA when available else CPU; ``"cuda"`` without a GPU is a TaxamapError."""
    import torch

    name = str(device) if device is not None else "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise TaxamapError(f"unknown device {name!r}; use auto, cpu or cuda") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TaxamapError(f"{option('device', 'cuda')} was asked for but no CUDA GPU is "
                           f"available; use {option('device', 'cpu')}")
    return dev


def resolve_dtype(device, dtype=None):
    """The autocast dtype for ``device``: None means plain float32.

    ``dtype`` None/"auto" picks bf16 on CUDA GPUs that support it (fp16 otherwise) and float32 on CPU;
    CPU stays float32 even when a half dtype is asked for (logged), so one setting serves both.
    """
    import torch

    if dtype is None or dtype == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, torch.dtype):
        key = str(dtype).replace("torch.", "")
    else:
        key = str(dtype).lower()
    if key not in _DTYPES:
        raise TaxamapError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    name = _DTYPES[key]
    if name is None:
        return None
    if device.type != "cuda":
        log.info("%s asked for on %s: running float32", name, device)
        return None
    return getattr(torch, name)


def autocast(device, dtype):
    """Context manager: autocast to ``dtype`` on CUDA, nothing otherwise."""
    import torch

    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def normalize_rows(x):
    """float32 numpy rows scaled to unit L2 norm (zero rows stay zero)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, np.float32(1e-12))).astype(np.float32)
