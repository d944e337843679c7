"""What the tests share and are not tests themselves: loopback servers standing in for the
services taxamap talks to (tiles, WMS, Hugging Face Hub, GBIF, iNaturalist, a stalled server,
``taxamap serve`` itself), tiny model checkpoints (:mod:`tests.helpers.tiny`), synthetic inputs
(WorldClim rasters, GeoTIFF maps, decompression bombs), independent re-computations
(:mod:`tests.helpers.reference`), the headless browser and the QGIS checker.

Benchmarks import them too (``from tests.helpers.tileserver import TileServer``).
"""
