"""Open a taxamap GeoTIFF in QGIS (PyQGIS, headless) and check what a QGIS user would see.

Run with the system Python that has QGIS: ``QT_QPA_PLATFORM=offscreen /usr/bin/python3
tests/helpers/qgis_check.py MAP.tif EXPECTED.json``. EXPECTED.json holds ``crs`` (authid),
``extent`` ([xmin, ymin, xmax, ymax]), ``bands`` (names in order), ``samples`` ([[x, y, band,
value], ...]; value null = expect no data) and ``tolerance``. Prints a JSON report; exit code 0
when every check passes, 1 otherwise.
"""

from __future__ import annotations

import json
import math
import os
import sys


def check(tif: str, expected: dict) -> list[str]:
    """Return the list of failed checks (empty when the file looks right in QGIS)."""
    from qgis.core import QgsApplication

    app = QgsApplication([], False)
    app.initQgis()
    try:
        # The layer must be gone before exitQgis, or QGIS crashes on the way out.
        return _check_layer(tif, expected)
    finally:
        app.exitQgis()


def _check_layer(tif: str, expected: dict) -> list[str]:
    from qgis.core import QgsPointXY, QgsRasterLayer

    failures: list[str] = []
    layer = QgsRasterLayer(tif, "taxamap", "gdal")
    if not layer.isValid():
        return [f"QGIS says the layer is not valid: {layer.error().summary()}"]
    authid = layer.crs().authid()
    if authid != expected["crs"]:
        failures.append(f"crs {authid} != {expected['crs']}")
    ext = layer.extent()
    got = [ext.xMinimum(), ext.yMinimum(), ext.xMaximum(), ext.yMaximum()]
    if any(abs(a - b) > 1e-9 for a, b in zip(got, expected["extent"])):
        failures.append(f"extent {got} != {expected['extent']}")
    if layer.bandCount() != len(expected["bands"]):
        failures.append(f"band count {layer.bandCount()} != {len(expected['bands'])}")
    provider = layer.dataProvider()
    for i, name in enumerate(expected["bands"], start=1):
        # QGIS shows "Band 1: fused" when the GeoTIFF carries a band description.
        shown = layer.bandName(i)
        if not shown.endswith(f": {name}"):
            failures.append(f"band {i} is shown as {shown!r}, expected it to name {name!r}")
    tol = float(expected.get("tolerance", 0.0))
    for x, y, band, value in expected["samples"]:
        got_value, ok = provider.sample(QgsPointXY(x, y), int(band))
        if value is None:
            if ok and not math.isnan(got_value):
                failures.append(f"({x}, {y}) band {band}: expected no data, got {got_value}")
        elif not ok or abs(got_value - value) > tol:
            failures.append(f"({x}, {y}) band {band}: expected {value}, got "
                            f"{got_value if ok else 'no value'}")
    return failures


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[2], encoding="utf-8") as fh:
        expected = json.load(fh)
    failures = check(argv[1], expected)
    print(json.dumps({"ok": not failures, "failures": failures}), flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # PyQGIS 3.22 can segfault while Python tears its objects down; the report is already out.
    os._exit(code)
