"""taxamap: zero-shot species-distribution maps from TaxaBind embeddings.

The public API (see :mod:`taxamap.api`)::

    import taxamap
    ds = taxamap.predict(species="Cardinalis cardinalis", region="usa")   # xarray.Dataset
    taxamap.write(ds, out="maps")                                          # COG, HTML, PNG
    rng = taxamap.threshold(ds, "percentile:90")                           # .raster, .polygons
    table = taxamap.evaluate(ds, occurrences=points)                       # pandas.DataFrame

``import taxamap`` stays light: the API's modules (and torch) load on first use.
"""

from taxamap.version import __version__  # noqa: E402

from taxamap.errors import TaxamapError  # noqa: E402

#: Names served lazily from :mod:`taxamap.api`.
_API = ("predict", "write", "embed", "threshold", "evaluate", "occurrences", "region", "regions",
        "Range", "open_session", "species_at", "richness", "survey")

__all__ = ["TaxamapError", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from taxamap import api

        return getattr(api, name)
    raise AttributeError(f"module 'taxamap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
