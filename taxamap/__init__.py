"""taxamap: zero-shot species-distribution maps from TaxaBind embeddings."""

__version__ = "0.1.0"

from taxamap.errors import TaxamapError  # noqa: E402

__all__ = ["TaxamapError", "__version__"]
