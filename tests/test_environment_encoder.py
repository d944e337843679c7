"""Environment encoder (SINR ResidualFCNet, MVRL/ecoclim layout) on tiny weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.torch import save_file

from taxamap.errors import ModelFilesMissing, TaxamapError
from taxamap.models.environment import load_environment_encoder
from taxamap.sources.worldclim import WorldClimFeatures
from tests.helpers.tiny import environment as tiny_env
from tests.helpers.tiny import write_models_dir, write_repo
from tests.helpers.worldclim_fixtures import write_rasters


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models_dir(tmp_path_factory.mktemp("models"),
                            ["MVRL/taxabind-config", "MVRL/ecoclim"])


@pytest.fixture(scope="module")
def encoder(models):
    return load_environment_encoder(models_dir=models)


def numpy_forward(weights: dict, x: np.ndarray, depth: int) -> np.ndarray:
    """Independent forward pass: Linear, ReLU, then depth blocks x + relu(W2 relu(W1 x))."""
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    h = relu(x.astype(np.float64) @ weights["feats.0.weight"].T + weights["feats.0.bias"])
    for i in range(2, depth + 2):
        y = relu(h @ weights[f"feats.{i}.w1.weight"].T + weights[f"feats.{i}.w1.bias"])
        y = relu(y @ weights[f"feats.{i}.w2.weight"].T + weights[f"feats.{i}.w2.bias"])
        h = h + y
    return h / np.linalg.norm(h, axis=1, keepdims=True)


def test_loads_through_resolver_in_eval_mode(encoder, models):
    assert encoder.ref.startswith("MVRL/ecoclim@local")
    assert encoder.device == "cpu"
    assert encoder.num_inputs == 20 and encoder.dim == 512
    assert not any(m.training for m in encoder.model.modules())
    keys = set(encoder.model.state_dict())
    assert "feats.0.weight" in keys and "feats.3.w2.bias" in keys
    assert not any(k.startswith("class_emb") for k in keys)


def test_encode_matches_numpy_forward(encoder, models):
    x = np.random.default_rng(0).normal(size=(64, 20)).astype(np.float32)
    got = encoder.encode(x)
    assert got.shape == (64, 512) and got.dtype == np.float32
    weights = {k: v.astype(np.float64)
               for k, v in load_file(str(models / "MVRL/ecoclim/model.safetensors")).items()}
    ref = numpy_forward(weights, x, depth=tiny_env.CONFIG["depth"])
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_deterministic_unit_norm_and_nan_passthrough(encoder):
    x = np.random.default_rng(1).normal(size=(50, 20)).astype(np.float32)
    a, b = encoder.encode(x), encoder.encode(x)
    np.testing.assert_array_equal(a, b)  # dropout is off
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    x[[3, 17]] = np.nan
    x[20, 5] = np.nan
    c = encoder.encode(x, batch_size=7)
    assert np.isnan(c[[3, 17, 20]]).all()
    keep = np.setdiff1d(np.arange(50), [3, 17, 20])
    assert not np.isnan(c[keep]).any()
    np.testing.assert_allclose(c[keep], a[keep], atol=1e-6)
    assert encoder.encode(np.zeros((0, 20))).shape == (0, 512)
    with pytest.raises(TaxamapError, match=r"\(N, 20\)"):
        encoder.encode(np.zeros((4, 19)))


def test_sizes_come_from_config_and_config_names_the_repo(tmp_path):
    folder = tmp_path / "someorg" / "otherclim"
    folder.mkdir(parents=True)
    conf = {"num_inputs": 20, "num_filts": 512, "depth": 1}  # no num_classes, no class_emb
    (folder / "config.json").write_text(json.dumps(conf))
    state = tiny_env.state_dict(seed=3, depth=1, num_classes=0)
    save_file(state, str(folder / "model.safetensors"))
    enc = load_environment_encoder(models_dir=tmp_path, config={"env_encoder": "someorg/otherclim"})
    assert enc.ref.startswith("someorg/otherclim@local")
    x = np.random.default_rng(2).normal(size=(5, 20)).astype(np.float32)
    weights = {k: v.double().numpy() for k, v in state.items()}
    np.testing.assert_allclose(enc.encode(x), numpy_forward(weights, x, depth=1), atol=2e-5)


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    folder = write_repo(tmp_path, "MVRL/ecoclim")
    conf = dict(tiny_env.CONFIG, depth=3)  # config says 3 blocks, weights hold 2
    (folder / "config.json").write_text(json.dumps(conf))
    with pytest.raises(TaxamapError, match="missing") as err:
        load_environment_encoder(models_dir=tmp_path, config={})
    assert "\n" not in str(err.value)
    conf = dict(tiny_env.CONFIG, num_filts=256)
    (folder / "config.json").write_text(json.dumps(conf))
    with pytest.raises(TaxamapError, match="does not fit") as err:
        load_environment_encoder(models_dir=tmp_path, config={})
    assert "\n" not in str(err.value)
    (folder / "config.json").write_text(json.dumps({"num_inputs": 20}))
    with pytest.raises(TaxamapError, match="num_filts"):
        load_environment_encoder(models_dir=tmp_path, config={})
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFilesMissing, match="model.safetensors"):
        load_environment_encoder(models_dir=tmp_path, config={})


def test_worldclim_features_into_encoder(encoder, tmp_path):
    wc = write_rasters(tmp_path / "wc")
    pts = np.array([[0.0, 0.0], [45.0, 10.0], [10.0, -170.0], [-30.0, 100.0]])
    emb = encoder.encode(WorldClimFeatures(wc.folder).features(pts))
    # (0, 0) and the western band are open water in the fixture: masked, the rest embedded.
    assert np.isnan(emb[[0, 2]]).all() and not np.isnan(emb[[1, 3]]).any()


# --- precision (issue 20): bf16 residual blocks where the hardware has bf16 ---

def test_forced_fp32_is_bit_identical_to_the_float32_forward(models):
    import torch

    enc = load_environment_encoder(models_dir=models, precision="fp32")
    assert enc.precision == "fp32"
    assert all(p.dtype == torch.float32 for p in enc.model.parameters())
    w = {k: torch.from_numpy(v)
         for k, v in load_file(str(models / "MVRL/ecoclim/model.safetensors")).items()}
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(500, 20)).astype(np.float32))
    h = torch.relu(torch.nn.functional.linear(x, w["feats.0.weight"], w["feats.0.bias"]))
    for i in range(2, tiny_env.CONFIG["depth"] + 2):
        y = torch.relu(torch.nn.functional.linear(h, w[f"feats.{i}.w1.weight"],
                                                  w[f"feats.{i}.w1.bias"]))
        y = torch.relu(torch.nn.functional.linear(y, w[f"feats.{i}.w2.weight"],
                                                  w[f"feats.{i}.w2.bias"]))
        h = h + y
    expected = torch.nn.functional.normalize(h, dim=-1).numpy()
    np.testing.assert_array_equal(enc.encode(x.numpy()), expected)


def test_bf16_mixed_scores_within_bound_input_layer_float32(models, encoder):
    import torch

    mixed = load_environment_encoder(models_dir=models, precision="bf16-mixed")
    assert mixed.precision == "bf16-mixed"
    first, *blocks = [m for m in mixed.model.modules() if isinstance(m, torch.nn.Linear)]
    assert first.weight.dtype == torch.float32 and first.in_features == 20
    assert len(blocks) == 2 * tiny_env.CONFIG["depth"]
    assert all(m.weight.dtype == torch.bfloat16 for m in blocks)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 20)).astype(np.float32)
    x[[5, 9]] = np.nan
    a, b = encoder.encode(x), mixed.encode(x)
    assert np.isnan(b[[5, 9]]).all() and b.dtype == np.float32
    a, b = np.delete(a, [5, 9], axis=0), np.delete(b, [5, 9], axis=0)
    assert not np.array_equal(a, b)  # the bf16 layers did run
    assert np.sum(a * b, axis=1).min() >= 0.9999
    random = rng.normal(size=(20, 512))
    queries = np.r_[random / np.linalg.norm(random, axis=1, keepdims=True), a[:20]]
    delta = np.abs((a[20:] - b[20:]) @ queries.T)
    assert np.percentile(delta, 99) <= 0.002


def test_unknown_precision_is_one_line_before_loading(models):
    with pytest.raises(TaxamapError, match="choose auto") as err:
        load_environment_encoder(models_dir=models, precision="half")
    assert "\n" not in str(err.value)
