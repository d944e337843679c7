"""The precision of the cell encoders' forward pass (location and environment encoders).

``fp32``
    Everything in float32, as TaxaBind trained the models.
``bf16-mixed``
    The MLP layers' weights and activations in bfloat16, everything else in float32: the location
    encoder's Equal Earth projection and random Fourier features (its sigma = 256 branch
    multiplies by ~1e3 before a cosine, where bf16 moved scores by 0.17), the environment
    encoder's input layer and residual sums, and the output.

``auto`` picks ``bf16-mixed`` only where bf16 matrix products run natively: CUDA GPUs with bf16
(compute capability 8.0 and later) and x86 CPUs whose flags show AVX512-BF16 or AMX-BF16
(oneDNN's bf16 kernels). Elsewhere torch emulates bf16 and it is slower than float32 (an AVX2
EPYC here: 1.7 vs 8.3 GFLOP/s for a 1024-wide layer), so ``auto`` runs float32. The choice reads
CPU flags, not a timing, so that a machine always makes the same choice: the precision is part
of a store's identity. ``benchmarks/precision_encoders.py`` measures both paths.
"""

from __future__ import annotations

import functools
from pathlib import Path

from taxamap.errors import TaxamapError
from taxamap.surface import option

FP32 = "fp32"
BF16_MIXED = "bf16-mixed"
#: What a caller may ask for; ``bf16-mixed`` forces the mixed path even where it is slow.
PRECISIONS = ("auto", FP32, BF16_MIXED)
#: x86 CPU flags (/proc/cpuinfo) of native bf16 dot products: Zen 4 and later, Cooper Lake,
#: Sapphire Rapids and later. AVX-512 alone is not enough: oneDNN then emulates bf16.
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=4)  # read once per process: every store open asks
def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (empty where there is no cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def check_precision(requested: str | None) -> str:
    """``requested`` (None = auto) as one of :data:`PRECISIONS`, or a TaxamapError."""
    name = str(requested or "auto").lower()
    if name not in PRECISIONS:
        raise TaxamapError(f"unknown {option('precision', requested)}; choose auto (bf16 layers "
                           "where the hardware runs them natively), fp32 or bf16-mixed")
    return name


def choose_precision(requested: str | None, device_type: str, *,
                     cpu_flags: frozenset[str] = frozenset(), cuda_bf16: bool = False) -> str:
    """The precision to run, ``fp32`` or ``bf16-mixed``, from explicit capabilities.

    ``device_type``: "cpu" or "cuda"; ``cpu_flags``: the CPU's flags (:func:`cpu_flags`);
    ``cuda_bf16``: whether the GPU has native bf16.
    """
    name = check_precision(requested)
    if name != "auto":
        return name
    if device_type == "cuda":
        return BF16_MIXED if cuda_bf16 else FP32
    if device_type == "cpu" and cpu_flags & CPU_BF16_FLAGS:
        return BF16_MIXED
    return FP32


def resolve_precision(requested: str | None, device) -> str:
    """:func:`choose_precision` with this machine's capabilities for ``device`` ("cpu", "cuda",
    "cuda:1" or a torch.device). Torch is imported only for a CUDA device."""
    device_type = str(device).split(":", 1)[0]
    name = check_precision(requested)
    if name != "auto":
        return name
    if device_type == "cuda":
        import torch

        return choose_precision(name, device_type,
                                cuda_bf16=torch.cuda.is_bf16_supported(including_emulation=False))
    return choose_precision(name, device_type, cpu_flags=cpu_flags())


def gpu_possible() -> bool:
    """Whether a GPU may be visible to torch, judged without importing it: False only on Linux
    with no NVIDIA (``/dev/nvidiactl``) or ROCm (``/dev/kfd``) device node, where
    ``torch.cuda.is_available()`` is False too."""
    import sys

    if not sys.platform.startswith("linux"):
        return True
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))


def cell_precision(requested: str | None, device_option: str, device) -> str:
    """The precision a cell encoder runs under the options ``--precision`` (``requested``) and
    ``--device`` (``device_option``; ``device()`` resolves it): what keys its store, known before
    any weights load. Torch is imported only where a GPU may be the device, so a warm query on a
    CPU machine never imports it."""
    name = check_precision(requested)
    if name != "auto":
        return name
    if device_option == "cpu" or (device_option == "auto" and not gpu_possible()):
        return resolve_precision(name, "cpu")
    return resolve_precision(name, device())


def cast_layers(layers, precision: str) -> None:
    """Give ``layers`` (torch modules) bf16 weights for ``bf16-mixed``; leave them for ``fp32``."""
    if precision == BF16_MIXED:
        import torch

        for layer in layers:
            layer.to(torch.bfloat16)
