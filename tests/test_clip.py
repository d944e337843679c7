"""Image+text encoder (MVRL/taxabind-vit-b-16 via open_clip) and the shared image preprocessing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from taxamap.errors import ModelFilesMissing, TaxamapError
from taxamap.models.clip import load_clip
from taxamap.models.hub import DEFAULT_CONFIG
from taxamap.models.preprocess import build_transform, load_image, spec_from_config
from tests.helpers import tiny
from tests.helpers.tiny import write_repo

REPO = "MVRL/taxabind-vit-b-16"
CARDINAL = "Animalia Chordata Aves Passeriformes Cardinalidae Cardinalis cardinalis"
OAK = "Plantae Tracheophyta Magnoliopsida Fagales Fagaceae Quercus alba"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def independent_transform():
    """TaxaBind's training pipeline written out from TAXABIND.md, independent of taxamap."""
    return transforms.Compose([
        transforms.Resize((256, 256)),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])


def photo(w=320, h=200, seed=0) -> Image.Image:
    """A non-square image with structure (gradients + noise), so crops and squashes show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.int32)
    arr = np.clip(arr + rng.integers(-20, 20, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


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
    return load_clip(models)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.delenv("TAXAMAP_MODELS", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_text_embeddings_shape_norm_and_distinct(enc, models):
    assert enc.ref.startswith(REPO + "@")
    assert enc.device.type == "cpu"
    emb = enc.encode_text([CARDINAL, OAK, CARDINAL])
    assert emb.shape == (3, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb[0], emb[2])
    assert float(emb[0] @ emb[1]) < 0.99
    again = load_clip(models).encode_text([CARDINAL])
    np.testing.assert_allclose(again[0], emb[0], atol=1e-6)
    assert enc.encode_text([]).shape == (0, 512)
    with pytest.raises(TaxamapError):
        enc.encode_text([""])


def test_text_matches_open_clip_reference(enc, models):
    """Same numbers as open_clip's own loader + its built-in ViT-B-16 tokenizer."""
    import open_clip

    ref_model = open_clip.create_model(f"local-dir:{models / REPO}").eval()
    tok = open_clip.get_tokenizer("ViT-B-16")
    with torch.no_grad():
        want = ref_model.encode_text(tok([CARDINAL, OAK]), normalize=True).numpy()
    np.testing.assert_allclose(enc.encode_text([CARDINAL, OAK]), want, atol=1e-5)


def test_preprocessing_is_taxabind_not_open_clip_default(enc):
    img = photo(320, 200)
    want = independent_transform()(img)
    got = enc.preprocess([img])
    assert got.shape == (1, 3, 224, 224)
    torch.testing.assert_close(got[0], want, atol=1e-6, rtol=0)
    # open_clip's default pipeline (aspect-preserving resize, OpenAI stats) differs: guard the choice.
    import open_clip

    _, _, oc_pre = open_clip.create_model_and_transforms("ViT-B-16")
    assert (oc_pre(img) - want).abs().max() > 0.05


def test_spec_from_config_reads_sizes_and_defaults():
    spec = spec_from_config({"image_resize": 300, "image_crop": 256, "normalize_mean": None})
    assert (spec.resize, spec.crop, spec.mean) == (300, 256, (0.485, 0.456, 0.406))
    x = build_transform(spec)(photo(100, 50))
    assert tuple(x.shape) == (3, 256, 256)
    with pytest.raises(TaxamapError):
        spec_from_config({"image_resize": 200, "image_crop": 224})


def test_encode_image_equals_manual_forward(enc, models):
    import open_clip

    imgs = [photo(320, 200, 1), photo(180, 260, 2), photo(224, 224, 3)]
    ref_model = open_clip.create_model(f"local-dir:{models / REPO}").eval()
    x = torch.stack([independent_transform()(im) for im in imgs])
    with torch.no_grad():
        want = ref_model.encode_image(x, normalize=True).numpy()
    got = enc.encode_image(imgs)
    assert got.shape == (3, 512) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(got, enc.encode_image(imgs))
    assert float(got[0] @ got[1]) < 0.999


def test_hf_cache_offline_loads_same_model(offline_cache, enc):
    write_hf_cache(offline_cache, REPO)
    cached = load_clip(config=DEFAULT_CONFIG)
    assert cached.ref == f"{REPO}@{COMMIT}"
    np.testing.assert_allclose(cached.encode_text([OAK]), enc.encode_text([OAK]), atol=1e-6)


def test_missing_weights_offline_lists_files(offline_cache):
    with pytest.raises(ModelFilesMissing) as err:
        load_clip(config=DEFAULT_CONFIG)
    msg = str(err.value)
    assert "\n" not in msg
    assert "open_clip_config.json" in msg and "open_clip_model.safetensors" in msg
    assert "HF_HUB_OFFLINE" in msg and "--models" in msg


def test_models_folder_missing_weights(tmp_path):
    folder = write_repo(tmp_path, REPO)
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(ModelFilesMissing, match="open_clip_model.safetensors or open_clip_pytorch_model.bin"):
        load_clip(tmp_path, config=DEFAULT_CONFIG)


def test_bin_twin_and_mismatched_config(tmp_path, enc):
    from safetensors.torch import load_file

    folder = write_repo(tmp_path, REPO)
    state = load_file(str(folder / "open_clip_model.safetensors"))
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_model.safetensors").unlink()
    twin = load_clip(tmp_path, config=DEFAULT_CONFIG)
    np.testing.assert_allclose(twin.encode_text([CARDINAL]), enc.encode_text([CARDINAL]), atol=1e-6)

    import json

    cfg = json.loads((folder / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"]["width"] = 32
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TaxamapError, match="do not match") as err:
        load_clip(tmp_path, config=DEFAULT_CONFIG)
    assert "\n" not in str(err.value)


def test_load_image_formats_and_exif(tmp_path):
    # Stored 40x20: left half red, right half blue; EXIF orientation 6 = display rotated 90° CW,
    # so the viewer sees a 20x40 image with red on top.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    img = load_image(tmp_path / "rot.jpg")
    assert img.size == (20, 40) and img.mode == "RGB"
    top, bottom = np.asarray(img)[5, 10], np.asarray(img)[35, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60

    rgba = np.zeros((10, 12, 4), np.uint8)  # fully transparent black -> white, not black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.asarray(load_image(tmp_path / "a.png")).min() == 255
    photo(50, 30).save(tmp_path / "p.webp")
    assert load_image(tmp_path / "p.webp").size == (50, 30)
    Image.fromarray(np.full((8, 8), 128, np.uint8), "L").save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png").mode == "RGB"


def test_load_image_bounds_the_pixels_it_decodes(tmp_path):
    import tracemalloc

    from tests.helpers.bombs import png_bomb

    photo(800, 600).save(tmp_path / "big.jpg", quality=90)
    photo(800, 600).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.jpg").size == (800, 600)
    # Over the bound, a JPEG is decoded by libjpeg at half size; a PNG cannot be, so it is refused.
    assert load_image(tmp_path / "big.jpg", max_pixels=200_000).size == (400, 300)
    assert load_image(tmp_path / "big.jpg", max_pixels=10_000).size == (100, 75)
    with pytest.raises(TaxamapError, match=r"800 x 600 pixels \(0 Mpx\); taxamap decodes "
                       r"photos of up to 0.2 Mpx"):
        load_image(tmp_path / "big.png", max_pixels=200_000)
    with pytest.raises(TaxamapError, match="800 x 600"):
        load_image(tmp_path / "big.jpg", max_pixels=5_000)  # even 1/8 is too large
    bomb = png_bomb(tmp_path / "bomb.png", 12000, 12000)  # 432 MB of RGB, refused unread
    tracemalloc.start()
    try:
        with pytest.raises(TaxamapError, match=r"12,000 x 12,000 pixels \(144 Mpx\)"):
            load_image(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20


def test_load_image_errors(tmp_path):
    with pytest.raises(TaxamapError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(TaxamapError, match="cannot read image"):
        load_image(tmp_path / "text.jpg")
    buf = io.BytesIO()
    photo(200, 200).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(TaxamapError, match="corrupt or truncated") as err:
        load_image(tmp_path / "cut.jpg")
    assert "\n" not in str(err.value)
    with pytest.raises(TaxamapError):
        load_image(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_autocast_close_to_fp32(models, enc):
    gpu = load_clip(models, device="cuda")
    assert gpu.dtype in (torch.bfloat16, torch.float16)
    imgs = [photo(320, 200, 1), photo(180, 260, 2)]
    for got, want in ((gpu.encode_image(imgs), enc.encode_image(imgs)),
                      (gpu.encode_text([CARDINAL, OAK]), enc.encode_text([CARDINAL, OAK]))):
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
        assert (got * want).sum(1).min() > 0.99
