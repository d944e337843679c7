"""The location encoder: GeoCLIP's architecture on GeoCLIP's real weights, and the tiny layout."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from taxamap.models.hub import load_weights
from taxamap.models.location import equal_earth, load_location_encoder

# The points that break careless implementations: poles, the antimeridian, (0, 0), swapped axes.
EDGE_POINTS = [
    [90.0, 0.0], [-90.0, 0.0], [0.0, 0.0], [0.0, 180.0], [0.0, -180.0], [45.0, 179.999],
    [-45.0, -179.999], [89.999, 179.9], [-89.999, -179.9], [40.7128, -74.006], [-33.86, 151.21],
]


def _geoclip_pth() -> str:
    geoclip = pytest.importorskip("geoclip")
    return os.path.join(os.path.dirname(geoclip.__file__), "model", "weights",
                        "location_encoder_weights.pth")


@pytest.fixture(scope="module")
def reference_and_ours():
    path = _geoclip_pth()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from geoclip import LocationEncoder as Reference

        reference = Reference().eval()
    return reference, load_location_encoder(checkpoint=path)


@pytest.mark.slow
def test_matches_geoclip_reference_on_real_weights(reference_and_ours):
    reference, ours = reference_and_ours
    rng = np.random.default_rng(0)
    random = np.c_[rng.uniform(-90, 90, 500), rng.uniform(-180, 180, 500)]
    points = torch.tensor(np.r_[EDGE_POINTS, random], dtype=torch.float32)
    with torch.inference_mode():
        expected = reference(points)
    got = ours.forward(points)
    assert got.shape == (points.shape[0], 512)
    assert float((expected - got).abs().max()) <= 1e-5
    normalised = torch.nn.functional.normalize(expected, dim=-1).numpy()
    assert np.abs(ours.encode(points.numpy()) - normalised).max() <= 1e-5


def test_lat_lon_order_matters(reference_and_ours):
    _, ours = reference_and_ours
    a = ours.encode(np.array([[40.0, -100.0]]))
    b = ours.encode(np.array([[-100.0 / 2, 40.0]]))
    assert float(a[0] @ b[0]) < 0.99


def test_subnormals_are_flushed_and_outputs_unchanged(reference_and_ours):
    path = _geoclip_pth()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    count = sum(int(((v != 0) & (v.abs() < torch.finfo(v.dtype).tiny)).sum()) for v in raw.values())
    assert count > 50_000  # GeoCLIP's checkpoint carries ~97 k
    flushed = load_weights(path)
    assert all(int(((v != 0) & (v.abs() < torch.finfo(v.dtype).tiny)).sum()) == 0
               for v in flushed.values())


def test_equal_earth_known_values():
    pts = torch.tensor([[0.0, 0.0], [0.0, 180.0], [90.0, 0.0]], dtype=torch.float32)
    xy = equal_earth(pts).numpy()
    assert np.allclose(xy[0], [0.0, 0.0])
    # x at the equator, lon 180: 2*sqrt(3)*pi / (3*A1) * SF / 180
    assert np.isclose(xy[1, 0], 2 * np.sqrt(3) * np.pi / (3 * 1.340264) * 66.50336 / 180, rtol=1e-5)
    assert xy[2, 0] == pytest.approx(0.0, abs=1e-6) and xy[2, 1] > 0


def test_tiny_model_loads_from_models_folder(tmp_path):
    from tests.helpers.tiny import write_repo

    write_repo(tmp_path, "MVRL/ecogeo")
    enc = load_location_encoder(models_dir=tmp_path)
    out = enc.encode(np.array(EDGE_POINTS))
    assert out.shape == (len(EDGE_POINTS), 512)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert enc.ref.startswith("MVRL/ecogeo@local-")
    # Independent computation of one point with plain numpy from the same weights.
    from safetensors.numpy import load_file

    w = load_file(str(tmp_path / "MVRL/ecogeo/model.safetensors"))
    lat, lon = np.deg2rad(40.7128), np.deg2rad(-74.006)
    theta = np.arcsin(np.sqrt(3) / 2 * np.sin(lat))
    A1, A2, A3, A4, SF = 1.340264, -0.081106, 0.000893, 0.003796, 66.50336
    x = 2 * np.sqrt(3) * lon * np.cos(theta) / (3 * (9 * A4 * theta**8 + 7 * A3 * theta**6 + 3 * A2 * theta**2 + A1))
    y = A4 * theta**9 + A3 * theta**7 + A2 * theta**3 + A1 * theta
    v = np.array([x, y]) * SF / 180
    total = 0
    for i in range(3):
        p = f"LocEnc{i}."
        h = 2 * np.pi * v @ w[p + "capsule.0.b"].T
        h = np.concatenate([np.cos(h), np.sin(h)])
        for j in (1, 3, 5):
            h = np.maximum(w[f"{p}capsule.{j}.weight"] @ h + w[f"{p}capsule.{j}.bias"], 0)
        total = total + w[p + "head.0.weight"] @ h + w[p + "head.0.bias"]
    expected = total / np.linalg.norm(total)
    assert np.abs(out[9] - expected).max() < 1e-4


def test_missing_weights_offline_says_how_to_fix(tmp_path):
    from taxamap.errors import ModelFilesMissing

    with pytest.raises(ModelFilesMissing) as err:
        load_location_encoder(models_dir=tmp_path)
    msg = str(err.value)
    assert "model.safetensors" in msg and "taxamap models download" in msg and "\n" not in msg


def test_hf_cache_layout_offline(tmp_path, monkeypatch):
    """The same tiny files, laid out as a Hugging Face cache snapshot, load with HF_HUB_OFFLINE."""
    from tests.helpers.tiny import write_hf_cache

    commit = "0123456789abcdef0123456789abcdef01234567"
    write_hf_cache(tmp_path / "hub", "MVRL/ecogeo", commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = load_location_encoder()
    assert enc.ref == f"MVRL/ecogeo@{commit}"
    assert enc.encode(np.array([[0.0, 0.0]])).shape == (1, 512)
