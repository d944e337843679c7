"""A stand-in for Earth Engine's client at the network boundary (no earthengine-api, no network)."""

from __future__ import annotations

import io

import numpy as np


def npy_bytes(size: int, dn=(1500, 600, 3000), valid=None) -> bytes:
    """A structured NPY array as computePixels returns it: one uint16 field per band."""
    dtype = [("B4", "<u2"), ("B3", "<u2"), ("B2", "<u2"), ("valid", "<u2")]
    arr = np.zeros((size, size), dtype=dtype)
    arr["B4"], arr["B3"], arr["B2"] = dn
    arr["valid"] = 1 if valid is None else valid
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


class FakeClient:
    """Stands in for EarthEngineClient: records requests, replays scripted errors, returns NPY."""

    def __init__(self, errors=(), valid=None, dn=(1500, 600, 3000)):
        self.errors = list(errors)
        self.valid = valid
        self.dn = dn
        self.requests: list[dict] = []
        self.project = "unset"

    def initialize(self, project):
        self.project = project

    def compute_pixels(self, request):
        self.requests.append(request)
        if self.errors:
            raise self.errors.pop(0)
        return npy_bytes(request["grid"]["dimensions"]["width"], self.dn, self.valid)
