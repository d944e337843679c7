"""Regenerate docs/example.png: the PNG writer's output for a USA grid at 0.1 degree.

    python docs/make_example.py

The cell embeddings are real (GeoCLIP's published location-encoder weights, which TaxaBind's
location encoder starts from, in the MVRL/ecogeo layout). The query is NOT a species: it is the
location embedding of Columbus, Ohio, because the TaxaBind text encoder cannot be downloaded where
this repository is built. With the real weights, `taxamap predict --species ...` draws the same
kind of figure for a species.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import models_dir  # noqa: E402

from taxamap.grid import make_grid  # noqa: E402
from taxamap.models.location import load_location_encoder  # noqa: E402
from taxamap.geography import resolve_region  # noqa: E402
from taxamap.dataset import provenance, scores_dataset  # noqa: E402
from taxamap.score import fuse  # noqa: E402
from taxamap.writers.png import write_png  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = models_dir(Path(tmp))
        encoder = load_location_encoder(models)
        region = resolve_region("usa")
        grid = make_grid(region.geometry, 0.1)
        cells = encoder.encode(grid.cell_latlon())
        query = encoder.encode(np.array([[39.96, -83.0]]))[0]
        fused, per = fuse({"location": cells}, query)
        ds = scores_dataset(
            grid, fused[None], {"location": per["location"][None]},
            labels=["example: cells like Columbus, Ohio (location query, not a species)"],
            prompts=[None], slugs=["example"],
            attrs=provenance(modalities=["location"], fusion="mean",
                             models={"location": "GeoCLIP weights"}, region_name=region.name,
                             region_outline=region.outline, resolution=grid.resolution))
        print(write_png(ds, ROOT / "docs" / "example.png"))


if __name__ == "__main__":
    main()
