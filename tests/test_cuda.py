"""CUDA paths (skipped without a GPU): the same results as the CPU within bf16/fp16 rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_location_encoder_cuda_equals_cpu(tmp_path):
    from taxamap.models.location import load_location_encoder
    from tests.helpers.tiny import write_repo

    write_repo(tmp_path, "MVRL/ecogeo")
    rng = np.random.default_rng(0)
    latlon = np.c_[rng.uniform(-90, 90, 3000), rng.uniform(-180, 180, 3000)]
    cpu = load_location_encoder(tmp_path, device="cpu").encode(latlon)
    gpu = load_location_encoder(tmp_path, device="cuda").encode(latlon)
    # TF32 matmuls may be on for CUDA: allow their rounding.
    assert np.abs(cpu - gpu).max() < 5e-3
    assert (np.sum(cpu * gpu, axis=1) > 0.9999).all()


def test_engine_on_cuda_streams_blocks(tmp_path):
    from taxamap import engine
    from taxamap.models.location import load_location_encoder
    from tests.helpers.tiny import write_repo

    write_repo(tmp_path, "MVRL/ecogeo")
    enc = load_location_encoder(tmp_path, device="cuda")
    latlon = np.c_[np.linspace(-60, 60, 5000), np.linspace(-170, 170, 5000)]
    out = engine.embed_in_memory(latlon, engine.location_embedder(enc), block_cells=1024,
                                 progress=False)
    assert out.shape == (5000, 512) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-4)
    assert np.allclose(out, enc.encode(latlon), atol=1e-5)


def test_pick_device_auto_is_cuda():
    from taxamap.devices import pick_device

    assert pick_device("auto") == "cuda"
