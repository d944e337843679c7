"""The ground footprint of a satellite patch: what TaxaBind's satellite encoder was trained on.

iSatNat (TaxaBind's satellite training set) fetched one WMS GetMap per observation: a box in
EPSG:4326 through the four points 1,280 m east, north, west and south of the observation in its
local East-North-Up tangent plane on the WGS84 ellipsoid, rendered at 256 x 256 px. So a patch is
a 2,560 m x 2,560 m square at every latitude (~10 m/px) on a pixel grid regular in lon/lat.

Every satellite source in taxamap delivers that same footprint (:class:`Footprint`): the WMS
source asks for exactly that box; the tile, raster and Earth Engine sources resample their data
onto its pixel grid. This module holds the geometry (no I/O):

* :func:`enu_to_lonlat`: ENU offsets -> geodetic lon/lat (the textbook ENU -> ECEF -> geodetic
  chain; agrees with ``pymap3d.enu2geodetic`` to ~1e-14 degrees);
* :func:`footprint`: the :class:`Footprint` of a cell centre (None where a pole lies inside it);
* :meth:`Footprint.parts`: the box split at the antimeridian, as requests need it;
* :func:`resample_weights` / :func:`resample`: separable, anti-aliased (triangle-filter)
  resampling onto the footprint's grid when rows and columns map independently (Web Mercator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from taxamap.crs import wrap_lon

#: TaxaBind's footprint: 2 x 1,280 m in the local tangent plane (iSatNat's WMS bbox).
DEFAULT_FOOTPRINT_M = 2560.0
#: TaxaBind's patch size in pixels (the WMS width/height; the encoder then crops 224).
DEFAULT_SIZE = 256

# WGS84 (EPSG:4326's ellipsoid).
WGS84_A = 6378137.0
WGS84_F = 1.0 / 298.257223563
WGS84_E2 = WGS84_F * (2.0 - WGS84_F)


def enu_to_lonlat(lat0: float, lon0: float, east, north, up=0.0) -> tuple[np.ndarray, np.ndarray]:
    """(lon, lat) in degrees of points ``east``/``north``/``up`` metres from (lat0, lon0, h=0).

    ENU -> ECEF by the tangent-plane rotation at the origin, then ECEF -> geodetic by Bowring's
    fixed-point iteration (converged to double precision in a few steps for points near the
    ellipsoid). Longitudes come out in [-180, 180].
    """
    e, n, u = (np.asarray(v, dtype=np.float64) for v in (east, north, up))
    phi, lam = math.radians(lat0), math.radians(lon0)
    sp, cp, sl, cl = math.sin(phi), math.cos(phi), math.sin(lam), math.cos(lam)
    nu = WGS84_A / math.sqrt(1.0 - WGS84_E2 * sp * sp)
    x = nu * cp * cl - sl * e - sp * cl * n + cp * cl * u
    y = nu * cp * sl + cl * e - sp * sl * n + cp * sl * u
    z = nu * (1.0 - WGS84_E2) * sp + cp * n + sp * u
    lon = np.arctan2(y, x)
    r = np.hypot(x, y)
    lat = np.arctan2(z, r * (1.0 - WGS84_E2))
    for _ in range(6):
        s = np.sin(lat)
        nu_k = WGS84_A / np.sqrt(1.0 - WGS84_E2 * s * s)
        # Height from whichever of r, z is better conditioned at this latitude.
        with np.errstate(divide="ignore", invalid="ignore"):
            h = np.where(np.abs(lat) < math.pi / 4, r / np.cos(lat) - nu_k,
                         z / s - nu_k * (1.0 - WGS84_E2))
        lat = np.arctan2(z, r * (1.0 - WGS84_E2 * nu_k / (nu_k + h)))
    return np.degrees(lon), np.degrees(lat)


@dataclass(frozen=True)
class Part:
    """One request's share of a footprint: a box within [-180, 180] and its patch columns."""

    west: float
    south: float
    east: float
    north: float
    col0: int  # first patch column it fills
    col1: int  # one past the last

    @property
    def width(self) -> int:
        return self.col1 - self.col0

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        return (self.west, self.south, self.east, self.north)


@dataclass(frozen=True)
class Footprint:
    """A patch's box: lon/lat degrees, ``east > west`` always (either may pass +-180 by less than
    the box's width: the box crosses the antimeridian), ``size`` x ``size`` pixels regular in
    lon/lat, as a WMS in EPSG:4326 renders it."""

    lat: float
    lon: float
    west: float
    south: float
    east: float
    north: float
    size: int = DEFAULT_SIZE
    metres: float = DEFAULT_FOOTPRINT_M

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(W, S, E, N) in degrees (W/E unwrapped: see :attr:`crosses_antimeridian`)."""
        return (self.west, self.south, self.east, self.north)

    @property
    def dx(self) -> float:
        """Pixel width in degrees of longitude."""
        return (self.east - self.west) / self.size

    @property
    def dy(self) -> float:
        """Pixel height in degrees of latitude."""
        return (self.north - self.south) / self.size

    @property
    def metres_per_pixel(self) -> float:
        return self.metres / self.size

    @property
    def crosses_antimeridian(self) -> bool:
        return self.west < -180.0 or self.east > 180.0

    def col_lons(self) -> np.ndarray:
        """Longitudes of the pixel-column centres (unwrapped, like :attr:`bbox`)."""
        return self.west + (np.arange(self.size) + 0.5) * self.dx

    def row_lats(self) -> np.ndarray:
        """Latitudes of the pixel-row centres, north to south."""
        return self.north - (np.arange(self.size) + 0.5) * self.dy

    def parts(self) -> list[Part]:
        """The box as requests within [-180, 180] need it: one part, or two at the antimeridian.

        Each patch column goes to the side its centre lies on; the split edge is put on +-180
        (the two parts' pixels differ in width by less than half a pixel over the part).
        """
        w, e = self.west, self.east
        if w < -180.0:  # one convention: only the east edge may pass the antimeridian
            w, e = w + 360.0, e + 360.0
        if e <= 180.0:
            return [Part(w, self.south, e, self.north, 0, self.size)]
        split = int(np.clip(math.ceil((180.0 - w) / self.dx - 0.5), 0, self.size))
        if split == 0:
            return [Part(max(w - 360.0, -180.0), self.south, e - 360.0, self.north, 0, self.size)]
        if split == self.size:
            return [Part(w, self.south, min(e, 180.0), self.north, 0, self.size)]
        return [Part(w, self.south, 180.0, self.north, 0, split),
                Part(-180.0, self.south, e - 360.0, self.north, split, self.size)]

    def to_dict(self) -> dict:
        """JSON-able description (the ``taxamap patches`` sidecar's geometry)."""
        return {
            "lat": self.lat, "lon": self.lon, "crs": "EPSG:4326",
            "bbox": [self.west, self.south, self.east, self.north],
            "bbox_parts": [list(p.bbox) for p in self.parts()] if self.crosses_antimeridian else None,
            "footprint_m": self.metres, "size_px": self.size,
            "metres_per_pixel": self.metres_per_pixel,
        }


def footprint(lat: float, lon: float, metres: float = DEFAULT_FOOTPRINT_M,
              size: int = DEFAULT_SIZE) -> Footprint | None:
    """The patch box of a cell centre: W/E = longitudes of the points ``metres / 2`` west/east,
    S/N = latitudes of the points south/north, in the local ENU tangent plane (iSatNat's bbox).

    None where the box is undefined: non-finite input, or a pole within ``metres / 2`` (the
    north/south point would lie beyond it).
    """
    lat, lon = float(lat), float(lon)
    if not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 90.0:
        return None
    half = float(metres) / 2.0
    lons, lats = enu_to_lonlat(lat, lon, [half, 0.0, -half, 0.0], [0.0, half, 0.0, -half])
    e_lon, n_lat, w_lon, s_lat = float(lons[0]), float(lats[1]), float(lons[2]), float(lats[3])
    # A pole inside the box: the north (south) point went over it, to the opposite meridian.
    for k in (1, 3):
        if abs(float(wrap_lon(lons[k] - lon))) > 90.0:
            return None
    if not (s_lat < lat < n_lat):
        return None
    # pymap3d-style outputs are in [-180, 180]; keep E > W by unwrapping only at the antimeridian
    # (left untouched otherwise, so the WMS bbox is bit-for-bit the training one).
    lon0 = float(wrap_lon(lon)) if abs(lon) > 180.0 else lon
    if w_lon > lon0:
        w_lon -= 360.0
    if e_lon < lon0:
        e_lon += 360.0
    return Footprint(lat, lon0, w_lon, s_lat, e_lon, n_lat, int(size), float(metres))


def check_footprint_options(metres, size) -> tuple[float, int]:
    """Validate ``--sat-footprint``/``--sat-size`` once for every source."""
    from taxamap.errors import TaxamapError
    from taxamap.surface import option

    metres = DEFAULT_FOOTPRINT_M if metres is None else float(metres)
    size = DEFAULT_SIZE if size is None else int(size)
    if not (math.isfinite(metres) and 10.0 <= metres <= 200_000.0):
        raise TaxamapError(f"{option('sat-footprint')} must be between 10 and 200000 metres, "
                           f"not {metres:g}")
    if not 16 <= size <= 4096:
        raise TaxamapError(f"{option('sat-size')} must be between 16 and 4096 pixels, not {size}")
    return metres, size


def resample_weights(positions: np.ndarray, n_src: int) -> np.ndarray:
    """(len(positions), n_src) float32 weights of a triangle (bilinear) filter.

    ``positions`` are the target pixel centres in source pixel coordinates (source pixel j spans
    [j, j + 1)). Where targets are spaced wider than a source pixel, the filter widens to the local
    spacing, so downsampling averages instead of aliasing (PIL's anti-aliased bilinear does the
    same). Rows sum to 1.
    """
    p = np.asarray(positions, dtype=np.float64)
    spacing = np.abs(np.gradient(p)) if p.size > 1 else np.ones(1)
    support = np.maximum(spacing, 1.0)[:, None]
    centres = np.arange(n_src, dtype=np.float64)[None, :] + 0.5
    w = np.clip(1.0 - np.abs(centres - p[:, None]) / support, 0.0, None)
    total = w.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise ValueError("a target pixel lies outside the source image")
    return (w / total).astype(np.float32)


def resample(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Resample an (H, W, C) uint8 image at target row/column centres (source pixel coordinates,
    see :func:`resample_weights`) into a (len(rows), len(cols), C) uint8 image."""
    img = np.asarray(image, dtype=np.float32)
    wy = resample_weights(rows, img.shape[0])
    wx = resample_weights(cols, img.shape[1])
    h, w, c = img.shape
    rows_done = (wy @ img.reshape(h, w * c)).reshape(len(wy), w, c)  # (R, W, C)
    out = np.matmul(rows_done.transpose(2, 0, 1), wx.T).transpose(1, 2, 0)  # (R, X, C)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
