"""``taxamap serve``: a local web app that maps any species on a stored grid in well under a second.

The server is a thin client of the library: a :class:`~taxamap.session.MapSession` scores
queries, the writers' helpers colour the overlays, :func:`taxamap.write` and
:func:`taxamap.threshold` make the downloads and range outlines. The HTTP API (``GET /api/map``,
``/api/cell``, ``/api/download``, ``POST /api/query``, ...) is the contract in DESIGN.md ("Web
app"); the page at ``/`` is one client of it.

Needs the ``serve`` extra: ``pip install 'taxamap[serve]'`` (Starlette, uvicorn,
python-multipart, and Leaflet from XStatic-Leaflet so the page works with no internet).
"""

from __future__ import annotations

from taxamap.errors import TaxamapError

#: What to install when the web stack is missing.
INSTALL_HINT = "pip install 'taxamap[serve]'"


def require_web_stack() -> None:
    """TaxamapError naming the extra when Starlette, uvicorn or python-multipart is missing."""
    missing = []
    for modules, package in ((("starlette",), "starlette"), (("uvicorn",), "uvicorn"),
                             (("python_multipart", "multipart"), "python-multipart")):
        for module in modules:
            try:
                __import__(module)
                break
            except ImportError:
                continue
        else:
            missing.append(package)
    if missing:
        raise TaxamapError(f"taxamap serve needs {', '.join(missing)}: {INSTALL_HINT}")
