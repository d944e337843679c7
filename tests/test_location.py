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


# --- precision (issue 20): bf16 MLP layers where the hardware has bf16, float32 otherwise ---

#: The bound the issue sets for the mixed path: p99 |delta score| over unit queries.
P99_BOUND = 0.002


def _torch_fp32_forward(state: dict, latlon: torch.Tensor) -> torch.Tensor:
    """GeoCLIP's forward pass op for op in plain torch float32, from the state dict."""
    import math

    v = equal_earth(latlon)
    total = None
    for i in range(3):
        p = f"LocEnc{i}."
        h = 2 * math.pi * v @ state[p + "capsule.0.b"].T
        h = torch.cat((torch.cos(h), torch.sin(h)), dim=-1)
        for j in (1, 3, 5):
            h = torch.relu(torch.nn.functional.linear(
                h, state[f"{p}capsule.{j}.weight"], state[f"{p}capsule.{j}.bias"]))
        y = torch.nn.functional.linear(h, state[p + "head.0.weight"], state[p + "head.0.bias"])
        total = y if total is None else total + y
    return total


@pytest.fixture(scope="module")
def tiny_location(tmp_path_factory):
    from tests.helpers.tiny import write_repo

    root = tmp_path_factory.mktemp("models")
    write_repo(root, "MVRL/ecogeo")
    return root


def _world_points(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.r_[EDGE_POINTS, np.c_[rng.uniform(-90, 90, n), rng.uniform(-180, 180, n)]]


def test_forced_fp32_is_bit_identical_to_the_float32_forward(tiny_location):
    enc = load_location_encoder(models_dir=tiny_location, precision="fp32")
    assert enc.precision == "fp32"
    assert all(p.dtype == torch.float32 for p in enc.module.parameters())
    points = torch.tensor(_world_points(2000, 1), dtype=torch.float32)
    state = load_weights(tiny_location / "MVRL/ecogeo/model.safetensors")
    assert torch.equal(enc.forward(points), _torch_fp32_forward(state, points))


def test_forced_fp32_is_bit_identical_to_geoclip_reference():
    path = _geoclip_pth()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from geoclip import LocationEncoder as Reference

        reference = Reference().eval()
    ours = load_location_encoder(checkpoint=path, precision="fp32")
    points = torch.tensor(_world_points(1000, 2), dtype=torch.float32)
    with torch.inference_mode():
        assert torch.equal(ours.forward(points), reference(points))


def test_bf16_mixed_keeps_fourier_features_float32_and_scores_within_bound(tiny_location):
    fp32 = load_location_encoder(models_dir=tiny_location, precision="fp32")
    mixed = load_location_encoder(models_dir=tiny_location, precision="bf16-mixed")
    assert mixed.precision == "bf16-mixed"
    for branch in (mixed.module.LocEnc0, mixed.module.LocEnc1, mixed.module.LocEnc2):
        assert branch.capsule[0].b.dtype == torch.float32
        linears = [m for m in branch.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 4 and all(m.weight.dtype == torch.bfloat16 for m in linears)
    points = _world_points(3000, 3)
    a, b = fp32.encode(points), mixed.encode(points)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert not np.array_equal(a, b)  # the bf16 layers did run
    assert np.sum(a * b, axis=1).min() >= 0.9999
    # Scores against random unit queries and data queries (fp32 embeddings of other places).
    rng = np.random.default_rng(4)
    random = rng.normal(size=(20, 512))
    queries = np.r_[random / np.linalg.norm(random, axis=1, keepdims=True),
                    fp32.encode(_world_points(20, 5)[len(EDGE_POINTS):])]
    delta = np.abs((a - b) @ queries.T)
    assert np.percentile(delta, 99) <= P99_BOUND


def test_auto_precision_decision_from_capabilities():
    from taxamap.errors import TaxamapError
    from taxamap.models.precision import choose_precision

    zen4 = frozenset({"avx2", "avx512f", "avx512bw", "avx512_bf16"})
    sapphire_rapids = frozenset({"avx2", "avx512f", "amx_bf16", "amx_tile"})
    skylake = frozenset({"avx2", "avx512f", "avx512bw"})  # AVX-512 but no native bf16
    epyc_avx2 = frozenset({"avx2", "fma", "f16c"})
    assert choose_precision("auto", "cpu", cpu_flags=zen4) == "bf16-mixed"
    assert choose_precision("auto", "cpu", cpu_flags=sapphire_rapids) == "bf16-mixed"
    assert choose_precision("auto", "cpu", cpu_flags=skylake) == "fp32"
    assert choose_precision("auto", "cpu", cpu_flags=epyc_avx2) == "fp32"
    assert choose_precision(None, "cpu", cpu_flags=frozenset()) == "fp32"
    assert choose_precision("auto", "cuda", cuda_bf16=True) == "bf16-mixed"
    assert choose_precision("auto", "cuda", cuda_bf16=False) == "fp32"  # e.g. a T4: fp32
    assert choose_precision("auto", "mps", cpu_flags=zen4) == "fp32"
    # Forcing wins over the hardware, either way.
    assert choose_precision("fp32", "cpu", cpu_flags=zen4) == "fp32"
    assert choose_precision("FP32", "cuda", cuda_bf16=True) == "fp32"
    assert choose_precision("bf16-mixed", "cpu", cpu_flags=epyc_avx2) == "bf16-mixed"
    with pytest.raises(TaxamapError, match="choose auto") as err:
        choose_precision("bf16", "cpu")
    assert "\n" not in str(err.value)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    from taxamap.models.precision import cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\n"
                    "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "absent") == frozenset()


def test_auto_on_this_machine_follows_its_flags(tiny_location):
    from taxamap.models.precision import CPU_BF16_FLAGS, cpu_flags

    enc = load_location_encoder(models_dir=tiny_location, precision="auto")
    native = bool(cpu_flags() & CPU_BF16_FLAGS)
    assert enc.precision == ("bf16-mixed" if native else "fp32")
    dtypes = {m.weight.dtype for m in enc.module.modules() if isinstance(m, torch.nn.Linear)}
    assert dtypes == {torch.bfloat16 if native else torch.float32}


def test_the_precision_option_is_checked_and_resolved_without_loading_weights():
    from taxamap.errors import TaxamapError
    from taxamap.models.precision import cell_precision
    from taxamap.options import GridOptions

    assert GridOptions().precision == "auto"
    assert GridOptions(precision="FP32").precision == "fp32"
    with pytest.raises(TaxamapError, match="choose auto") as err:
        GridOptions(precision="bf16")
    assert "--precision" in str(err.value) and "\n" not in str(err.value)

    def no_device():
        raise AssertionError("the device was resolved")

    # Forced, or auto on the CPU: known from the options and the CPU flags alone.
    assert cell_precision("fp32", "cuda", no_device) == "fp32"
    assert cell_precision("bf16-mixed", "auto", no_device) == "bf16-mixed"
    assert cell_precision("auto", "cpu", no_device) in ("fp32", "bf16-mixed")
