"""`taxamap patches`: the exact patches the satellite encoder sees, for every source."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from taxamap.cli import main
from taxamap.sources.satellite import patch_at, patch_name, write_patches
from tests.helpers.earthengine import FakeClient
from tests.helpers.isatnat import TRAINING_ROWS
from tests.helpers.rasters import geographic_raster
from tests.helpers.tileserver import TileServer
from tests.helpers.wmsserver import WMSServer


def read(folder, lat, lon):
    stem = patch_name(lat, lon)
    meta = json.loads((folder / f"{stem}.json").read_text())
    png = folder / f"{stem}.png"
    return (np.asarray(Image.open(png)) if png.exists() else None), meta


def check_meta(meta, lat, lon, kind):
    assert meta["lat"] == lat and meta["lon"] == lon and meta["source"]["kind"] == kind
    assert meta["footprint_m"] == 2560 and meta["size_px"] == 256 and meta["metres_per_pixel"] == 10
    assert meta["crs"] == "EPSG:4326" and len(meta["bbox"]) == 4 and meta["missing"] is False
    w, s, e, n = meta["bbox"]
    assert w < lon < e and s < lat < n


def test_wms_patches_are_the_training_requests(tmp_path, capsys):
    lat, lon, *bbox = TRAINING_ROWS[0]
    with WMSServer() as server:
        code = main(["patches", "--lat", str(lat), "--lon", str(lon), "--lat", "-70", "--lon", "140",
                     "--lat", "89.999", "--lon", "0", "--sat-url", server.url,
                     "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "p")])
        assert code == 0 and server.errors == [] and server.requests == 2
    out, err = capsys.readouterr()
    printed = out.split()
    assert sorted(p.rsplit("/", 1)[1] for p in printed) == sorted(
        ["-26.77723_152.88014.png", "-26.77723_152.88014.json", "-70_140.png", "-70_140.json",
         "89.999_0.json"])
    assert "no imagery at (89.999, 0.0)" in err
    rgb, meta = read(tmp_path / "p", lat, lon)
    assert rgb.shape == (256, 256, 3) and rgb.dtype == np.uint8
    check_meta(meta, lat, lon, "wms")
    np.testing.assert_allclose(meta["bbox"], bbox, rtol=0, atol=1e-9)
    (url,) = meta["requests"]
    assert "layers=s2cloudless-2020&styles=&width=256&height=256&srs=EPSG:4326&bbox=" in url
    assert "s2maps.eu" in meta["attribution"] and meta["license"] == "CC BY-NC-SA 4.0"
    assert meta["file"] == "-26.77723_152.88014.png"
    _, pole = read(tmp_path / "p", 89.999, 0.0)
    assert pole["missing"] is True and pole["failed"] is False and "pole" in pole["reason"]
    assert not list((tmp_path / "p").glob(".*"))  # no temporary leftovers


def test_xyz_patches_name_their_tiles(tmp_path, capsys):
    with TileServer(fmt="png") as server:
        template = server.url_template
        code = main(["patches", "--lat", "60", "--lon", "-179.999", "--sat-source", "xyz",
                     "--sat-url", template, "--cache", str(tmp_path / "c"),
                     "--out", str(tmp_path / "p")])
        assert code == 0
    rgb, meta = read(tmp_path / "p", 60.0, -179.999)
    assert rgb.shape == (256, 256, 3)
    check_meta(meta, 60.0, -179.999, "xyz")
    assert meta["zoom"] == 13 and meta["bbox_parts"] is not None  # crosses the antimeridian
    prefix = template.split("{z}")[0] + "13/"
    assert meta["tiles"] and all(t.startswith(prefix) for t in meta["tiles"])
    assert {t.split("/")[-2] for t in meta["tiles"]} >= {"0", str(2**13 - 1)}  # both world edges


def test_file_patches(tmp_path, capsys):
    path = geographic_raster(tmp_path)
    code = main(["patches", "--lat", "41", "--lon", "11.5", "--sat-source", "file", "--sat-file",
                 str(path), "--sat-size", "128", "--out", str(tmp_path / "p")])
    assert code == 0
    rgb, meta = read(tmp_path / "p", 41.0, 11.5)
    assert rgb.shape == (128, 128, 3) and meta["size_px"] == 128 and meta["metres_per_pixel"] == 20
    assert meta["source"]["kind"] == "file" and meta["source"]["path"] == str(path.resolve())


def test_earthengine_patches_through_the_library(tmp_path):
    from taxamap.sources.earthengine import EarthEngineSource

    client = FakeClient()
    with EarthEngineSource(project="p", client=client, cache_dir=tmp_path / "c") as src:
        rgb, meta = patch_at(src, 10.0, 20.0)
        written = write_patches([(10.0, 20.0)], tmp_path / "p", src)
    assert rgb.shape == (256, 256, 3)
    check_meta(meta, 10.0, 20.0, "earthengine")
    (req,) = meta["requests"]
    assert req["grid"]["crsCode"] == "EPSG:4326" and "composite" not in req
    (item,) = written
    np.testing.assert_array_equal(np.asarray(Image.open(item.png)), rgb)
    assert json.loads(item.json.read_text())["bbox"] == meta["bbox"]
    assert len(client.requests) == 1  # the second look came from the cache


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["patches", "--lat", "1", "--lat", "2", "--lon", "3", "--out", str(tmp_path)]) == 2
    assert "one --lon per --lat" in capsys.readouterr().err
    assert main(["patches", "--lat", "1", "--lon", "3", "--sat-footprint", "-5",
                 "--out", str(tmp_path)]) == 2
    assert "--sat-footprint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["patches", "--lat", "1", "--out", str(tmp_path)])  # --lon missing: argparse usage


def test_patch_name():
    assert patch_name(40.1, -83.25) == "40.1_-83.25"
    assert patch_name(-0.0000001, 10) == "0_10"
    assert patch_name(1.23456789, 2) == "1.234568_2"
