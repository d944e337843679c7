"""The notebooks in notebooks/ run top to bottom on tiny models, offline, and are committed clean.

Each notebook is executed with nbclient in a fresh kernel whose working directory is a temporary
folder. The environment points it at tiny models (``TAXAMAP_MODELS``), a loopback WMS server
(``TAXAMAP_SAT_URL``) and synthetic WorldClim rasters (``TAXAMAP_WORLDCLIM``), with the Hub and
taxamap both offline; the notebooks fall back to the real defaults when those are unset.
Set ``TAXAMAP_NOTEBOOK_OUT=DIR`` to keep the executed notebooks (with outputs) in DIR.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import nbformat
import numpy as np
import pytest
import rasterio
from nbclient import NotebookClient
from PIL import Image

from tests.helpers.wmsserver import WMSServer
from tests.helpers.worldclim_fixtures import write_rasters

# Each test executes a notebook in a kernel: end to end, out of the quick loop.
pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT = 300
#: Largest output a committed notebook may carry (bytes of JSON per cell); 0 outputs is the norm.
MAX_COMMITTED_OUTPUT = 2000


@pytest.fixture(scope="module")
def worldclim(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("worldclim")
    write_rasters(folder, height=36, width=72)
    return folder


@pytest.fixture()
def notebook_env(monkeypatch, tmp_path, models_dir, worldclim):
    """Environment for the kernel (it inherits the test process's environment)."""
    env = {
        "TAXAMAP_MODELS": str(models_dir),
        "TAXAMAP_CACHE": str(tmp_path / "cache"),
        "TAXAMAP_WORLDCLIM": str(worldclim),
        "HF_HUB_OFFLINE": "1",
        "TAXAMAP_OFFLINE": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "PYTHONWARNINGS": "ignore",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TAXAMAP_SAT_URL", raising=False)
    return env


def execute(name: str, workdir: Path) -> nbformat.NotebookNode:
    """Run notebooks/<name> in ``workdir``; nbclient raises CellExecutionError on any error."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    workdir.mkdir(parents=True, exist_ok=True)
    NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    ).execute()
    for cell in nb.cells:
        if cell.cell_type == "code":
            errors = [o for o in cell.outputs if o.output_type == "error"]
            assert not errors, errors
    keep = os.environ.get("TAXAMAP_NOTEBOOK_OUT")  # to look at the executed notebooks
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, Path(keep) / name)
    return nb


def text_of(nb) -> str:
    """All stream and text/plain output of the executed notebook."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == "stdout":
                parts.append(out.text)
            elif "data" in out and "text/plain" in out.data:
                parts.append(out.data["text/plain"])
    return "\n".join(parts)


def images_of(nb) -> list[np.ndarray]:
    """Every inline PNG the notebook displayed, decoded."""
    images = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if png:
                images.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")))
    return images


def assert_not_blank(image: np.ndarray) -> None:
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20  # a plot, not a flat page


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebooks_are_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        size = len(nbformat.writes(nbformat.from_dict({"o": cell.outputs}), version=4)) \
            if cell.outputs else 0
        assert size <= MAX_COMMITTED_OUTPUT, f"{path.name}: clear the outputs before committing"
        assert cell.execution_count is None or not cell.outputs


def test_three_notebooks_exist():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["01_quickstart.ipynb", "02_multimodal.ipynb", "03_evaluation.ipynb"]


def test_quickstart(tmp_path, notebook_env):
    work = tmp_path / "work"
    nb = execute("01_quickstart.ipynb", work)
    out = text_of(nb)
    assert "prompt: Animalia Chordata Aves Passeriformes Cardinalidae Cardinalis cardinalis" in out
    assert "cells:  1134" in out  # Ohio at 0.1 deg, land cells (its part of Lake Erie is not)
    assert "bands: ('fused', 'location')" in out
    assert "Poecile carolinensis" in out
    for name in ("cardinalis-cardinalis.tif", "cardinalis-cardinalis.html",
                 "cardinalis-cardinalis.png", "poecile-carolinensis.tif",
                 "cardinalis-cardinalis_range.tif", "cardinalis-cardinalis_range.gpkg"):
        assert (work / "maps" / name).is_file(), name
    with rasterio.open(work / "maps" / "cardinalis-cardinalis_range.tif") as ds:
        binary = ds.read(1)
    valid = binary != 255
    assert valid.sum() == 1134
    assert 0.05 < (binary[valid] == 1).mean() < 0.15  # percentile:90 keeps about a tenth
    images = images_of(nb)
    assert len(images) == 2
    for image in images:
        assert_not_blank(image)


def test_multimodal(tmp_path, notebook_env, monkeypatch):
    work = tmp_path / "work"
    with WMSServer() as server:
        monkeypatch.setenv("TAXAMAP_SAT_URL", server.url)
        nb = execute("02_multimodal.ipynb", work)
        assert server.requests > 0  # the satellite band really came from the (default) WMS
        assert server.errors == []  # every request was the training one
    out = text_of(nb)
    assert "20 WorldClim rasters" in out
    assert "cells:  80" in out
    assert ("bands: ('fused', 'location', 'satellite', 'environment', 'disagreement', 'mess', "
            "'mess_variable')") in out
    tif = work / "maps-multimodal" / "cardinalis-cardinalis.tif"
    with rasterio.open(tif) as ds:
        bands = ds.read()
        assert ds.descriptions == ("fused", "location", "satellite", "environment",
                                   "disagreement", "mess", "mess_variable")
    assert np.isfinite(bands[0]).sum() == 80
    # the satellite and environment maps differ from the location one: three real modalities
    assert not np.allclose(bands[1], bands[2]) and not np.allclose(bands[1], bands[3])
    images = images_of(nb)
    assert len(images) == 1
    assert_not_blank(images[0])
    assert images[0].shape[1] > 2.5 * images[0].shape[0]  # four panels side by side


def test_evaluation(tmp_path, notebook_env):
    import importlib.util

    from taxamap.products.evaluate import evaluate_map

    work = tmp_path / "work"
    nb = execute("03_evaluation.ipynb", work)
    out = text_of(nb)
    folder = work / "maps-evaluation"
    for name in ("ariolimax-buttoni.tif", "ariolimax-buttoni.png", "evaluation.json", "roc.png",
                 "ariolimax-buttoni_range.tif", "ariolimax-buttoni_range.gpkg"):
        assert (folder / name).is_file(), name
    assert "AUC" in out and "max TSS" in out and "Boyce" in out
    assert "prompt: Animalia Mollusca Gastropoda Stylommatophora Ariolimacidae Ariolimax buttoni" \
        in out
    if importlib.util.find_spec("elapid") is not None:
        assert "ariolimax.gpkg: 1595 presences, 4990 background points" in out
    import json

    metrics = json.loads((folder / "evaluation.json").read_text())
    assert [b["name"] for b in metrics["bands"]] == ["fused", "location"]
    fused = metrics["bands"][0]
    assert 0.0 <= fused["auc"] <= 1.0
    assert f"AUC {fused['auc']:.3f}" in out
    images = images_of(nb)
    assert len(images) == 3  # the map, the ROC curves, the range over the records
    for image in images:
        assert_not_blank(image)
    # the notebook's numbers are the library's on the same map and points (not a re-implementation)
    assert metrics["map"].endswith("ariolimax-buttoni.tif")
    if importlib.util.find_spec("elapid") is not None:
        from taxamap.products.occurrences import read_labelled_points

        sample = Path(importlib.util.find_spec("elapid").origin).parent / "data" / "ariolimax.gpkg"
        pres, back = read_labelled_points(sample)
        again = evaluate_map(folder / "ariolimax-buttoni.tif", pres, back)
        assert again.band("fused").auc == pytest.approx(fused["auc"], abs=1e-6)


def test_evaluation_fallback_points_without_elapid(tmp_path, monkeypatch):
    """The evaluation notebook's data cell, run as if elapid were not installed, writes and reads
    its stand-in CSV (points on California's land, background left to sampling)."""
    import types

    from taxamap.geography import resolve_region

    nb = nbformat.read(NOTEBOOKS / "03_evaluation.ipynb", as_version=4)
    source = next(c.source for c in nb.cells
                  if c.cell_type == "code" and 'find_spec("elapid")' in c.source)
    no_elapid = types.SimpleNamespace(util=types.SimpleNamespace(find_spec=lambda name: None))
    namespace = {"importlib": no_elapid, "Path": Path, "np": np}
    monkeypatch.chdir(tmp_path)
    exec(compile(
        "from taxamap.products.occurrences import read_labelled_points, read_points\n" + source,
        "03_evaluation.ipynb", "exec"), namespace)
    assert (tmp_path / "demo_occurrences.csv").is_file()
    presences = namespace["presences"]
    assert namespace["background"] is None
    assert presences.shape == (300, 2)
    import shapely

    california = resolve_region("California", None).geometry
    inside = shapely.contains_xy(california, presences[:, 1], presences[:, 0])
    assert inside.mean() > 0.9  # mostly on land: a usable sample for evaluate_map


def test_readme_names_only_what_each_notebook_uses():
    """Every name notebooks/README.md puts in backticks beside a notebook (a function, a keyword,
    a rule) occurs in that notebook's code, so the guide never points at code it no longer runs."""
    import re

    readme = (NOTEBOOKS / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\d\d_\w+\.ipynb)` \| (.+) \|$", readme, re.MULTILINE)
    assert sorted(name for name, _ in rows) == sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    for name, text in rows:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        names = re.findall(r"`([^`]+)`", text)
        assert names, name
        missing = [n for n in names if n not in code]
        assert not missing, f"notebooks/README.md names {missing} for {name}, which does not use them"
