"""GPU benchmark (run when a GPU is lent): satellite encoder tiles/s in bf16 and its fraction of
the measured bf16 GEMM rate, location points/s, and end-to-end cells/s through the engine.

    python benchmarks/gpu.py            # or: bash benchmarks/gpu.sh (also runs the CUDA tests)

Weights are random at the released sizes (ViT-B/16 CLIP vision tower as MVRL/ecosat; GeoCLIP
location MLPs as MVRL/ecogeo): speed does not depend on their values.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import gemm_flops, machine  # noqa: E402

VIT_B16 = {
    "model_type": "clip_vision_model", "architectures": ["CLIPVisionModelWithProjection"],
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "projection_dim": 512,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3,
}


def sync():
    import torch

    torch.cuda.synchronize()


def timed(fn, repeats=5):
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def vit_flops_per_tile(cfg=VIT_B16) -> float:
    """Matmul FLOPs of one ViT forward (patch embed, attention, MLP, projection)."""
    tokens = (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1
    d, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    patch = 2 * (tokens - 1) * (3 * cfg["patch_size"] ** 2) * d
    per_layer = 2 * tokens * d * 3 * d + 2 * 2 * tokens * tokens * d + 2 * tokens * d * d \
        + 2 * 2 * tokens * d * f
    return patch + layers * per_layer + 2 * d * cfg["projection_dim"]


def write_satellite_repo(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(VIT_B16))
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**{k: v for k, v in VIT_B16.items()
                                                              if k not in ("model_type", "architectures")}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    del torch


def write_location_repo(folder: Path) -> None:
    from safetensors.torch import save_file

    from tests.helpers.tiny.location import state_dict

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"dim": 512, "encoded_size": 256,
                                                    "input_size": 2, "sigma": [1, 16, 256]}))
    save_file(state_dict(0, encoded=256, hidden=1024), str(folder / "model.safetensors"))


class SyntheticPatches:
    """An imagery source that makes patches in memory (no network): for timing the engine."""

    attribution = None
    license = None

    def __init__(self, size=256):
        rng = np.random.default_rng(0)
        from PIL import Image

        self.tiles = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
                      for _ in range(16)]

    def fetch(self, latlon):
        return [self.tiles[i % 16] for i in range(len(latlon))]

    def fetch_status(self, latlon):
        """The source interface (taxamap.sources.base): patches, and none failed."""
        return self.fetch(latlon), [False] * len(latlon)

    def describe(self):
        return {"kind": "synthetic"}


def main() -> None:
    import torch

    from taxamap import engine
    from taxamap.models.location import load_location_encoder
    from taxamap.models.satellite import load_satellite_encoder

    rows = []

    def add(row):
        rows.append(row)
        print(f"{row[0]:<58} {row[1]}", flush=True)
    bf16 = gemm_flops(8192, device="cuda", dtype=torch.bfloat16)
    fp32 = gemm_flops(8192, device="cuda", dtype=torch.float32)
    add(("bf16 GEMM 8192^3", f"{bf16 / 1e12:.0f} TFLOP/s"))
    add(("fp32 GEMM 8192^3 (TF32 per torch default)", f"{fp32 / 1e12:.0f} TFLOP/s"))
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        write_satellite_repo(models / "MVRL" / "ecosat")
        write_location_repo(models / "MVRL" / "ecogeo")
        sat = load_satellite_encoder(models, device="cuda")
        flops = vit_flops_per_tile()
        add(("ViT-B/16 GFLOP per tile", f"{flops / 1e9:.1f}"))
        for batch in (64, 256, 512):
            pixels = torch.randn(batch, 3, 224, 224, device="cuda")
            t = timed(partial(sat.encode_pixels, pixels))
            rate = batch / t
            add((f"satellite encoder as shipped (bf16 weights), batch {batch}",
                         f"{rate:.0f} tiles/s = {rate * flops / bf16:.0%} of bf16 GEMM"))
        # Variants to pick the production setting: weights cast to bf16 (no per-op autocast
        # casts), and the same under torch.compile.
        import copy

        model16 = copy.deepcopy(sat.model).to(torch.bfloat16).eval()
        pixels = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.bfloat16)

        def forward16(m):
            with torch.inference_mode():
                return m(pixel_values=pixels).image_embeds

        t = timed(partial(forward16, model16))
        add(("satellite, bf16 weights, batch 256", f"{256 / t:.0f} tiles/s = "
                     f"{256 / t * flops / bf16:.0%} of bf16 GEMM"))
        try:
            compiled = torch.compile(model16)
            t0 = time.perf_counter()
            forward16(compiled)
            sync()
            compile_s = time.perf_counter() - t0
            t = timed(lambda: forward16(compiled))
            add(("satellite, bf16 weights + torch.compile, batch 256",
                         f"{256 / t:.0f} tiles/s = {256 / t * flops / bf16:.0%} of bf16 GEMM "
                         f"(compile {compile_s:.0f} s)"))
        except Exception as exc:  # compile support varies by image
            add(("torch.compile", f"failed: {type(exc).__name__}: {exc}"[:120]))
        del model16
        loc = load_location_encoder(models, device="cuda")
        loc.batch_size = 65536
        latlon = np.c_[np.random.uniform(-90, 90, 500_000), np.random.uniform(-180, 180, 500_000)]
        t = timed(lambda: loc.encode(latlon), repeats=3)
        add(("location encoder fp32 (500k points, incl. host copies)",
                     f"{len(latlon) / t:,.0f} pts/s"))
        source = SyntheticPatches()
        cells = latlon[:8192]
        emb = engine.satellite_embedder(sat, source)
        engine.embed_in_memory(cells[:1024], emb, block_cells=1024, progress=False)
        t = time.perf_counter()
        engine.embed_in_memory(cells, emb, block_cells=4096, progress=False)
        t = time.perf_counter() - t
        add((f"engine end-to-end satellite ({emb.workers} prepare threads, batch {emb.batch_cells})",
             f"{len(cells) / t:,.0f} cells/s"))
        loc_emb = engine.location_embedder(loc)
        t = time.perf_counter()
        engine.embed_in_memory(latlon, loc_emb, block_cells=65536, progress=False)
        t = time.perf_counter() - t
        add(("engine end-to-end location (500k cells)", f"{len(latlon) / t:,.0f} cells/s"))
    print(f"machine: {machine()}")
    import os

    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_table.txt").write_text(
            f"machine: {machine()}\n" + "".join(f"{n:<58} {v}\n" for n, v in rows))


if __name__ == "__main__":
    main()
