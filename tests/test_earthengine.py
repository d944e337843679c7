"""Earth Engine source with a fake client at the network boundary (no earthengine-api, no network)."""

from __future__ import annotations

import io
import json
import sys
import types

import numpy as np
import pytest

from taxamap.errors import TaxamapError
from taxamap.sources.earthengine import (
    EarthEngineClient,
    EarthEngineSource,
    is_transient,
    stretch_to_uint8,
)
from taxamap.sources.satellite import SatelliteSource, make_satellite_source
from tests.helpers.earthengine import FakeClient


def make(tmp_path, client, **kw):
    opts = dict(project="my-project", size=64, cache_dir=tmp_path / "cache", workers=2,
                client=client, backoff=0.001, max_backoff=0.01)
    opts.update(kw)
    return EarthEngineSource(**opts)


def test_request_grid_is_the_footprint_centred_on_the_cell(tmp_path):
    client = FakeClient()
    with make(tmp_path, client, year=2021) as src:
        (patch,) = src.fetch([[40.0, -83.0]])
        assert client.project == "my-project"
    assert patch is not None and patch.size == (64, 64) and patch.mode == "RGB"
    (req,) = client.requests
    assert req["fileFormat"] == "NPY" and req["bandIds"] == ["B4", "B3", "B2", "valid"]
    comp = req["composite"]
    assert comp["collection"] == "COPERNICUS/S2_SR_HARMONIZED" and comp["year"] == 2021
    assert comp["cloud_mask"] == "SCL" and 9 not in comp["scl_keep"] and 4 in comp["scl_keep"]
    grid = req["grid"]
    assert grid["crsCode"] == "EPSG:4326" and grid["dimensions"] == {"width": 64, "height": 64}
    t = grid["affineTransform"]
    assert t["shearX"] == 0 and t["shearY"] == 0 and t["scaleX"] > 0 > t["scaleY"]
    # The box is TaxaBind's footprint: 2,560 m on the ground each way (pyproj's geodesics), centred
    # on the cell.
    from pyproj import Geod

    west, north = t["translateX"], t["translateY"]
    east, south = west + 64 * t["scaleX"], north + 64 * t["scaleY"]
    geod = Geod(ellps="WGS84")
    assert geod.inv(west, 40.0, east, 40.0)[2] == pytest.approx(2560, rel=1e-3)
    assert geod.inv(-83.0, south, -83.0, north)[2] == pytest.approx(2560, rel=1e-3)
    assert (west + east) / 2 == pytest.approx(-83.0, abs=1e-9)
    assert (south + north) / 2 == pytest.approx(40.0, abs=1e-6)


def test_antimeridian_cell_is_two_requests_side_by_side(tmp_path):
    class Halves(FakeClient):
        def compute_pixels(self, request):
            self.requests.append(request)
            west = request["grid"]["affineTransform"]["translateX"] > 0
            dims = request["grid"]["dimensions"]
            dtype = [("B4", "<u2"), ("B3", "<u2"), ("B2", "<u2"), ("valid", "<u2")]
            arr = np.zeros((dims["height"], dims["width"]), dtype=dtype)
            arr["B4"] = 3000 if west else 0  # red on the west side, blue on the east
            arr["B2"] = 0 if west else 3000
            arr["valid"] = 1
            buf = io.BytesIO()
            np.save(buf, arr)
            return buf.getvalue()

    client = Halves()
    with make(tmp_path, client, size=256) as src:
        (patch,) = src.fetch([[0.0, 179.999]])
    west, east = client.requests
    wt, et = west["grid"]["affineTransform"], east["grid"]["affineTransform"]
    split = west["grid"]["dimensions"]["width"]
    assert split + east["grid"]["dimensions"]["width"] == 256
    assert wt["translateX"] + split * wt["scaleX"] == pytest.approx(180.0)
    assert et["translateX"] == -180.0
    rgb = np.asarray(patch)
    assert (rgb[:, :split, 0] == 255).all() and (rgb[:, split:, 2] == 255).all()


def test_stretch_is_the_documented_one(tmp_path):
    with make(tmp_path, FakeClient(dn=(1500, 600, 3000))) as src:
        (patch,) = src.fetch([[10.0, 10.0]])
    want = [round(255 * min(v / 10000 / 0.3, 1) ** (1 / 1.2)) for v in (1500, 600, 3000)]
    assert np.asarray(patch)[5, 5].tolist() == want == [143, 67, 255]
    assert stretch_to_uint8(np.array([0, 4000])).tolist() == [0, 255]


def test_transient_errors_are_retried(tmp_path):
    class HttpError(Exception):
        def __init__(self, status):
            super().__init__(f"<HttpError {status}>")
            self.resp = types.SimpleNamespace(status=status)

    client = FakeClient(errors=[Exception("Too many concurrent aggregations."), HttpError(503)])
    with make(tmp_path, client) as src:
        (patch,) = src.fetch([[10.0, 10.0]])
        assert patch is not None and len(client.requests) == 3
        assert src.stats.retries == 2 and src.stats.failures == 0


def test_still_transient_after_retries_is_none(tmp_path):
    client = FakeClient(errors=[TimeoutError("read timed out")] * 10)
    with make(tmp_path, client, retries=2) as src:
        (patch,) = src.fetch([[10.0, 10.0]])
        assert patch is None and len(client.requests) == 3 and src.stats.failures == 1


def test_permanent_error_is_not_retried(tmp_path):
    client = FakeClient(errors=[Exception("Image.select: Pattern 'B4' did not match any bands.")])
    with make(tmp_path, client) as src:
        with pytest.raises(TaxamapError, match="refused the request: Image.select"):
            src.fetch([[10.0, 10.0]])
    assert len(client.requests) == 1
    assert not is_transient(Exception("User memory limit exceeded."))
    assert is_transient(Exception("Computation timed out."))


def test_permission_error_says_how_to_log_in(tmp_path):
    client = FakeClient(errors=[Exception("Permission denied: caller lacks earthengine.computations.create")])
    with make(tmp_path, client) as src, pytest.raises(TaxamapError, match="earthengine authenticate"):
        src.fetch([[10.0, 10.0]])


def test_missing_credentials_message(tmp_path):
    class EEException(Exception):
        pass

    def initialize(project=None):
        raise EEException("Please authorize access to your Earth Engine account by running\n\nearthengine authenticate")

    fake_ee = types.SimpleNamespace(Initialize=initialize)
    with pytest.raises(TaxamapError) as info:
        make_satellite_source("earthengine", ee_project="p", client=EarthEngineClient(ee_module=fake_ee),
                              cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "run 'earthengine authenticate'" in message and "--ee-project" in message


def test_missing_package_message(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ee", None)  # makes `import ee` fail like an absent package
    with pytest.raises(TaxamapError, match="pip install earthengine-api"):
        EarthEngineSource(project="p", cache_dir=tmp_path)


def test_cells_without_clear_data_are_none_and_remembered(tmp_path):
    valid = np.ones((64, 64), np.uint16)
    valid[:10] = 0  # 16 % of the window never had a clear observation
    client = FakeClient(valid=valid)
    with make(tmp_path, client) as src:
        assert src.fetch([[10.0, 10.0]]) == [None]
        assert src.stats.not_found == 1
        assert src.fetch([[10.0, 10.0]]) == [None] and len(client.requests) == 1


def test_second_run_makes_no_request(tmp_path):
    cells = np.array([[10.0, 10.0], [-5.0, 120.0], [89.999, 0.0]])  # no footprint at the pole
    client = FakeClient()
    with make(tmp_path, client) as src:
        first = src.fetch(cells)
    assert first[2] is None and len(client.requests) == 2
    again = FakeClient()
    with make(tmp_path, again) as src:
        second = src.fetch(cells)
        assert src.stats.cache_hits == 2
    assert again.requests == []
    for a, b in zip(first[:2], second[:2]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_describe_and_factory(tmp_path):
    src = make_satellite_source("earthengine", ee_project="p", year=2019, client=FakeClient(), cache_dir=tmp_path)
    assert isinstance(src, SatelliteSource)
    d = src.describe()
    assert d["kind"] == "earthengine" and d["year"] == 2019 and d["size"] == 256
    assert d["footprint_m"] == 2560
    assert d["stretch"] == {"reflectance_max": 0.3, "gamma": 1.2}
    assert "Copernicus Sentinel data 2019" in src.attribution
    with pytest.raises(TaxamapError, match="sat-year"):
        make_satellite_source("earthengine", year=2014, client=FakeClient(), cache_dir=tmp_path)
    src.close()


class FlakyClient(FakeClient):
    """Earth Engine down for some windows while ``down`` is set (every retry fails too)."""

    def __init__(self, failing_grids):
        super().__init__()
        self.failing = [json.dumps(g, sort_keys=True) for g in failing_grids]
        self.down = True

    def compute_pixels(self, request):
        if self.down and json.dumps(request["grid"], sort_keys=True) in self.failing:
            self.requests.append(request)
            raise Exception("503 Service Unavailable: backend error")
        return super().compute_pixels(request)


def test_failed_patches_leave_their_block_for_the_rerun(tmp_path, models_dir):
    from taxamap.models.satellite import load_satellite_encoder
    from tests.helpers.source_rerun import embed_through

    encoder = load_satellite_encoder(models_dir)
    cells = np.array([[10.0, 10.0], [10.5, 10.5], [-5.0, 120.0], [-5.5, 120.5], [30.0, -60.0],
                      [30.5, -60.5]])
    probe = make(tmp_path, FakeClient(), cache=False)
    failing = [probe.requests_for(*cells[i])[1][0][2]["grid"] for i in (2, 3)]  # block 1 of 3
    probe.close()
    client = FlakyClient(failing)
    with make(tmp_path, client, retries=1) as src:
        first = embed_through(src, cells, encoder, tmp_path / "store")
        assert src.stats.failures == 2 and src.stats.cells_failed == 2
    assert first.pending_chunks() == [1]  # the failed block is not recorded complete
    values = first.read()
    assert np.isnan(values[2:4]).all() and np.isfinite(values[[0, 1, 4, 5]]).all()

    client.down = False  # Earth Engine is back
    client.requests.clear()
    with make(tmp_path, client) as src:
        again = embed_through(src, cells, encoder, tmp_path / "store")
    assert again.pending_chunks() == [] and len(client.requests) == 2  # only block 1 again
    with make(tmp_path / "clean", FakeClient()) as src:
        reference = embed_through(src, cells, encoder, tmp_path / "reference").read()
    np.testing.assert_array_equal(again.read(), reference)
