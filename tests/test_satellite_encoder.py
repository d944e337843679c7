"""Satellite encoder (MVRL/ecosat via transformers CLIPVisionModelWithProjection)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from taxamap.errors import ModelFilesMissing, TaxamapError
from taxamap.models.hub import DEFAULT_CONFIG
from taxamap.models.satellite import load_satellite_encoder
from tests.helpers import tiny
from tests.helpers.tiny import write_repo

REPO = "MVRL/ecosat"
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def tile(w=256, h=256, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * (seed + 1)) % 256, y * 255 // h, (x * y) % 256], -1).astype(np.int32)
    arr = np.clip(arr + rng.integers(-15, 15, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def independent_pixels(images):
    """TAXABIND.md's satellite preprocessing, written out independently of taxamap."""
    t = transforms.Compose([
        transforms.Resize((256, 256)),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    return torch.stack([t(im) for im in images])


def write_hf_cache(cache: Path, repo: str, commit: str = COMMIT, seed: int = 0) -> Path:
    """A Hugging Face hub cache holding ``repo`` at ``commit`` with refs/main pointing at it."""
    return tiny.write_hf_cache(cache, repo, commit, seed=seed)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_repo(root, REPO)
    write_repo(root, "MVRL/taxabind-config")
    return root


@pytest.fixture(scope="module")
def enc(models):
    return load_satellite_encoder(models)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.delenv("TAXAMAP_MODELS", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_tiny_layout_is_save_pretrained(models):
    folder = models / REPO
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "clip_vision_model"
    assert cfg["architectures"] == ["CLIPVisionModelWithProjection"]
    assert cfg["projection_dim"] == 512 and cfg["image_size"] == 224


def test_encode_shape_norm_batches_and_determinism(enc, models):
    assert enc.ref.startswith(REPO + "@") and enc.device.type == "cpu" and enc.dtype is None
    imgs = [tile(seed=i) for i in range(5)]
    a = enc.encode(imgs, batch_size=2)
    assert a.shape == (5, 512) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, enc.encode(imgs, batch_size=5), atol=1e-5)
    np.testing.assert_allclose(a, load_satellite_encoder(models).encode(imgs), atol=1e-6)
    assert float(a[0] @ a[1]) < 0.999
    assert enc.encode([]).shape == (0, 512)
    with pytest.raises(TaxamapError):
        enc.encode([np.zeros((4, 4, 3))])


def test_matches_transformers_reference_on_independent_pixels(enc, models):
    """Same numbers as transformers' own loader on TAXABIND.md's preprocessing of non-square tiles."""
    from transformers import CLIPVisionModelWithProjection

    imgs = [tile(300, 200, 1), tile(256, 256, 2), tile(180, 400, 3)]
    ref = CLIPVisionModelWithProjection.from_pretrained(str(models / REPO)).eval()
    x = independent_pixels(imgs)
    torch.testing.assert_close(enc.preprocess(imgs), x, atol=1e-6, rtol=0)
    with torch.no_grad():
        want = ref(pixel_values=x).image_embeds
    want = torch.nn.functional.normalize(want, dim=-1).numpy()
    np.testing.assert_allclose(enc.encode(imgs), want, atol=1e-5)


def test_hf_cache_offline(offline_cache, enc):
    write_hf_cache(offline_cache, REPO)
    cached = load_satellite_encoder(config=DEFAULT_CONFIG)
    assert cached.ref == f"{REPO}@{COMMIT}"
    imgs = [tile(seed=7)]
    np.testing.assert_allclose(cached.encode(imgs), enc.encode(imgs), atol=1e-6)


def test_missing_weights_offline_lists_files(offline_cache):
    with pytest.raises(ModelFilesMissing) as err:
        load_satellite_encoder(config=DEFAULT_CONFIG)
    msg = str(err.value)
    assert "\n" not in msg and REPO in msg
    assert "config.json" in msg and "model.safetensors" in msg and "HF_HUB_OFFLINE" in msg


def _rewrite_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_unexpected_keys_reported_but_old_position_ids_accepted(tmp_path, enc):
    folder = write_repo(tmp_path, REPO)
    _rewrite_weights(
        folder,
        lambda s: s.__setitem__("vision_model.embeddings.position_ids", torch.arange(50)[None]),
    )
    old = load_satellite_encoder(tmp_path, config=DEFAULT_CONFIG)
    np.testing.assert_allclose(old.encode([tile()]), enc.encode([tile()]), atol=1e-6)

    _rewrite_weights(folder, lambda s: s.__setitem__("text_projection.weight", torch.zeros(512, 8)))
    with pytest.raises(TaxamapError, match="unexpected keys.*text_projection.weight") as err:
        load_satellite_encoder(tmp_path, config=DEFAULT_CONFIG)
    assert "\n" not in str(err.value)

    _rewrite_weights(folder, lambda s: (s.pop("text_projection.weight"), s.pop("visual_projection.weight")))
    with pytest.raises(TaxamapError, match="missing keys.*visual_projection.weight"):
        load_satellite_encoder(tmp_path, config=DEFAULT_CONFIG)


def test_full_clip_config_and_crop_mismatch(tmp_path, enc):
    folder = write_repo(tmp_path, REPO)
    vision = json.loads((folder / "config.json").read_text())
    full = {"model_type": "clip", "projection_dim": vision.pop("projection_dim"),
            "vision_config": vision}
    (folder / "config.json").write_text(json.dumps(full))
    loaded = load_satellite_encoder(tmp_path, config=DEFAULT_CONFIG)
    np.testing.assert_allclose(loaded.encode([tile()]), enc.encode([tile()]), atol=1e-6)

    with pytest.raises(TaxamapError, match="sat_crop"):
        load_satellite_encoder(tmp_path, config={**DEFAULT_CONFIG, "sat_resize": 256, "sat_crop": 192})


def test_half_precision_request_on_cpu_stays_float32(models, enc):
    cpu_half = load_satellite_encoder(models, device="cpu", dtype="bf16")
    assert cpu_half.dtype is None
    np.testing.assert_array_equal(cpu_half.encode([tile(seed=3)]), enc.encode([tile(seed=3)]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_autocast_close_to_fp32(models, enc):
    gpu = load_satellite_encoder(models, device="cuda")
    assert gpu.dtype in (torch.bfloat16, torch.float16)
    imgs = [tile(seed=i) for i in range(4)]
    got, want = gpu.encode(imgs), enc.encode(imgs)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert (got * want).sum(1).min() > 0.99
