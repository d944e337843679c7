"""Scoring: cosine similarity of a query embedding with each cell's embeddings, and fusion.

All embeddings are L2-normalised before any dot product. Scores are raw cosines in [-1, 1]; any
display stretch belongs to the HTML/PNG writers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from taxamap.errors import TaxamapError
from taxamap.surface import option

#: Modalities a cell can be embedded from, in GeoTIFF band order (after the fused band).
CELL_MODALITIES = ("location", "satellite", "environment")

#: Fusion rules: "mean" averages the per-modality cosine maps; "sum" is TaxaBind's own rule
#: (normalise the sum of the cell's normalised modality embeddings, then the cosine).
FUSIONS = ("mean", "sum")
DEFAULT_FUSION = "mean"


def normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """L2-normalise along ``axis`` (zero vectors stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def parse_modalities(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"location,satellite"`` -> ordered, de-duplicated list in band order; bad names raise."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in CELL_MODALITIES]
    if unknown or not names:
        raise TaxamapError(
            f"unknown modality {', '.join(unknown) or '(none)'}; choose from "
            f"{','.join(CELL_MODALITIES)} (comma-separated)"
        )
    return [m for m in CELL_MODALITIES if m in names]


def cosine(embeddings: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``embeddings`` (N, D) with ``query`` (D,); NaN rows stay NaN."""
    q = normalize(np.asarray(query, dtype=np.float32).reshape(-1))
    e = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(e, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (e @ q) / norms
    return out.astype(np.float32)


def fuse_many(
    embeddings: dict[str, np.ndarray],
    queries: np.ndarray,
    fusion: str = DEFAULT_FUSION,
    row_norms: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Score cells against several queries at once: one matrix product per modality.

    ``embeddings`` maps modality -> (N, D) float array; a row of NaN marks a cell that modality
    could not embed (a missing tile, open water). ``queries`` is (S, D). Fusion uses only the
    modalities a cell has; a cell with none is NaN. Returns (fused (S, N), {modality: (S, N)}).
    ``row_norms`` (modality -> (N,) row norms, NaN or 0 where a cell has no embedding) saves the
    pass over the embeddings that computes them, for callers that score the same cells often.
    """
    if fusion not in FUSIONS:
        raise TaxamapError(f"unknown {option('fusion', fusion)}; choose from {', '.join(FUSIONS)}")
    q = normalize(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
    per: dict[str, np.ndarray] = {}
    valid: dict[str, np.ndarray] = {}
    norms: dict[str, np.ndarray] = {}
    for m, e in embeddings.items():
        e = np.asarray(e, dtype=np.float32)
        if row_norms is not None and m in row_norms:
            n = np.asarray(row_norms[m], dtype=np.float32)
        else:
            # One pass for the norms; a NaN row (a cell this modality could not embed) has a NaN
            # norm.
            n = np.sqrt(np.einsum("ij,ij->i", e, e))
        ok = np.isfinite(n) & (n > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            scores = (e @ q.T).T / n  # (S, N)
        scores[:, ~ok] = np.nan
        per[m], valid[m], norms[m] = scores, ok, n
    if len(per) == 1:
        only = next(iter(per.values()))
        return only.copy(), per
    any_valid = np.logical_or.reduce(list(valid.values()))
    if fusion == "mean":
        stack = np.stack(list(per.values()))  # (M, S, N)
        finite = np.isfinite(stack)
        count = finite.sum(axis=0)
        total = np.where(finite, stack, 0.0).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            fused = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    else:
        # TaxaBind's rule: normalise(sum of the normalised embeddings the cell has) . q
        total = np.zeros((any_valid.shape[0], q.shape[1]), dtype=np.float32)
        for m, e in embeddings.items():
            ok = valid[m]
            total[ok] += np.asarray(e, dtype=np.float32)[ok] / norms[m][ok, None]
        fused = (normalize(total) @ q.T).T
        fused[:, ~any_valid] = np.nan
    return fused.astype(np.float32), per


def fuse(
    embeddings: dict[str, np.ndarray],
    query: np.ndarray,
    fusion: str = DEFAULT_FUSION,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`fuse_many` for one query (D,): returns (fused (N,), {modality: (N,)})."""
    fused, per = fuse_many(embeddings, np.asarray(query).reshape(1, -1), fusion)
    return fused[0], {m: v[0] for m, v in per.items()}


@dataclass
class ScoreMap:
    """Everything a writer needs: the grid, the score rasters and the provenance.

    ``fused`` and each ``layers[m]`` are (height, width) float32 rasters of raw cosines with NaN
    outside the kept cells. ``layers`` is ordered location, satellite, environment.
    """

    grid: "object"
    fused: np.ndarray
    layers: dict[str, np.ndarray]
    query: str
    prompt: str | None
    fusion: str
    models: dict[str, str] = field(default_factory=dict)
    attribution: str | None = None
    region_name: str = ""
    region_geometry: "object | None" = None
    slug: str = "map"
    extra_tags: dict[str, str] = field(default_factory=dict)
    #: Bands after the modalities (``fitted``, ``combined`` of ``--fit``), values in [0, 1].
    extra_bands: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def title(self) -> str:
        where = f" — {self.region_name}" if self.region_name else ""
        return f"{self.query}{where}"

    def bands(self) -> list[tuple[str, np.ndarray]]:
        """(description, raster) in GeoTIFF band order: fused first, then each modality, then
        the extra bands (``fitted``, ``combined``)."""
        return ([("fused", self.fused)] + [(m, self.layers[m]) for m in self.layers]
                + list(self.extra_bands.items()))

    @classmethod
    def from_dataset(cls, ds, outline=None) -> "ScoreMap":
        """The writers' view of a (y, x) score Dataset (see :mod:`taxamap.dataset`);
        ``outline`` is the region boundary to draw (a shapely geometry), if any."""
        from taxamap.dataset import grid_of, score_variables

        attrs = dict(ds.attrs)
        names = score_variables(ds)
        if "fused" not in names:
            raise TaxamapError("the Dataset has no 'fused' band; pass what taxamap.predict returned")
        models = {}
        for part in str(attrs.get("models", "")).split(";"):
            if "=" in part:
                k, v = part.split("=", 1)
                models[k.strip()] = v.strip()
        extra = {k.upper(): str(v) for k, v in attrs.items() if k not in _VIEW_ATTRS}
        if attrs.get("imagery_license"):
            extra["IMAGERY_LICENSE"] = str(attrs["imagery_license"])
        return cls(
            grid=grid_of(ds),
            fused=np.asarray(ds["fused"].values, dtype=np.float32),
            layers={n: np.asarray(ds[n].values, dtype=np.float32) for n in names
                    if n in CELL_MODALITIES},
            extra_bands={n: np.asarray(ds[n].values, dtype=np.float32) for n in names
                         if n != "fused" and n not in CELL_MODALITIES},
            query=str(attrs.get("query", "map")),
            prompt=str(attrs["prompt"]) if attrs.get("prompt") else None,
            fusion=str(attrs.get("fusion", DEFAULT_FUSION)),
            models=models,
            attribution=attrs.get("imagery_attribution") or None,
            region_name=str(attrs.get("region", "")),
            region_geometry=outline,
            slug=str(attrs.get("slug", "map")),
            extra_tags=extra,
        )


#: Dataset attrs the ScoreMap view holds in its own fields (the rest become extra GeoTIFF tags).
_VIEW_ATTRS = {"query", "prompt", "fusion", "models", "imagery_attribution", "imagery_license",
               "region", "slug", "bands", "modalities", "units", "taxamap_version", "source_path"}


def as_scoremap(obj, outline=None) -> ScoreMap:
    """A :class:`ScoreMap` as is, or the view of a (y, x) score Dataset."""
    if isinstance(obj, ScoreMap):
        if outline is not None:
            from dataclasses import replace

            return replace(obj, region_geometry=outline)
        return obj
    from taxamap.dataset import check_dataset

    ds = check_dataset(obj)
    if "species" in ds.dims:
        raise TaxamapError("this writer takes one map; select a species first "
                           "(ds.isel(species=0)) or use taxamap.write, which writes them all")
    return ScoreMap.from_dataset(ds, outline=outline)
