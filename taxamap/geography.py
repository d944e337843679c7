"""Region names, bounding boxes and vector files -> one shapely geometry on land (or water).

A region is resolved to a :class:`Region` whose ``geometry`` is what :func:`taxamap.grid.make_grid`
lays cells over (by default the region intersected with the land mask: Natural Earth 1:50m land
minus its 1:50m lakes; ``cells="water"`` keeps the ocean and lakes instead, ``cells="all"`` the whole
region) and whose ``outline`` is the region's own boundary, for drawing. Coordinates are EPSG:4326
(lon, lat) degrees.

Regions that cross the antimeridian (Fiji, Russia, Oceania, ``--bbox 170,-20,-170,10``) are
expressed in one continuous longitude frame, e.g. 170..190 rather than two pieces at +/-180, so the
grid over them is compact; the land mask is shifted into the same frame, and
:meth:`taxamap.grid.Grid.cell_latlon` wraps longitudes back into [-180, 180).
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import shapely

from taxamap import grids
from taxamap.crs import geometry_to_lonlat
from taxamap.errors import TaxamapError
from taxamap.options import check_cells
from taxamap.surface import current, option

BBox = tuple[float, float, float, float]

#: File name endings taken as vector files rather than preset names.
VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg", ".shp", ".zip", ".fgb", ".kml", ".gml",
                   ".geojson.gz", ".json.gz", ".shp.zip")


@dataclass(frozen=True, eq=False)
class Region:
    """A resolved region.

    ``geometry``: where cells are kept (the region intersected with land, or with water, or the
    whole region, as ``cells`` says); ``outline``: the region's boundary before land clipping, for
    drawing; ``bounds``: (west, south, east, north) of ``geometry`` (east may exceed 180 and west
    may be below -180 for regions across the antimeridian); ``kind``: the preset kind, "file" or
    "bbox"; ``cells``: one of :data:`CELL_CHOICES`.
    """

    name: str
    slug: str
    geometry: object
    outline: object
    bounds: BBox
    kind: str = "preset"
    cells: str = "land"


def resolve_region(
    region: Optional[str] = None,
    bbox: Union[str, tuple, list, None] = None,
    land_only: bool = True,
    cells: Optional[str] = None,
) -> Region:
    """Turn ``--region`` and/or ``--bbox`` into a :class:`Region`.

    ``region`` is a preset name (see ``taxamap regions``; any case) or a path to a vector file
    (GeoJSON, GeoPackage, Shapefile; any CRS, reprojected to EPSG:4326; all polygon features of
    the first layer are unioned). ``bbox`` is "W,S,E,N" in degrees or a 4-tuple; W > E means the
    box crosses the antimeridian. Given both, the region is the intersection of the two.

    ``cells`` chooses what the geometry keeps: "land" (the region intersected with the land mask,
    Natural Earth 1:50m land minus lakes), "water" (the region minus that land: ocean and lakes) or
    "all" (the region as it is). Without ``cells``, ``land_only`` (default True) means "land" and
    ``land_only=False`` means "all".
    """
    if cells is None:
        cells = "land" if land_only else "all"
    cells = check_cells(cells)
    if region is None and bbox is None:
        raise TaxamapError(f"give a region: {option('region', metavar='NAME|FILE')} (see "
                           f"{_presets_list()}) or {option('bbox', metavar='W,S,E,N')}")
    if region is not None:
        outline, name, slug, kind = _region_outline(str(region).strip())
    if bbox is not None:
        box_geom, box_slug = _bbox_geometry(bbox)
        box_name = f"bbox {box_slug.replace('_', ',')}"
        if region is None:
            outline, name, slug, kind = box_geom, box_name, f"bbox_{box_slug}", "bbox"
        else:
            outline = _intersect_any_frame(outline, box_geom)
            if outline.is_empty:
                raise TaxamapError(f"{option('bbox', _bbox_text(bbox))} does not overlap region "
                                   f"{name!r}; use a box that covers part of it")
            name, slug = f"{name} in {box_name}", f"{slug}_bbox_{box_slug}"
    outline = _compact_frame(outline)
    if cells == "land":
        geometry = _on_land(outline, is_box=(region is None))
        if geometry.is_empty:
            raise TaxamapError(f"region {name!r} has no land; cells are kept only on land, so use "
                               f"a region or {option('bbox')} that covers some land (or "
                               f"{option('cells', metavar='water|all')})")
    elif cells == "water":
        geometry = _in_water(outline)
        if geometry.is_empty:
            raise TaxamapError(f"region {name!r} has no water (ocean or lake) with "
                               f"{option('cells', 'water')}; use a region or {option('bbox')} that "
                               f"covers some, or {option('cells', metavar='land|all')}")
    else:
        geometry = outline
    return Region(name=name, slug=slug, geometry=geometry, outline=outline,
                  bounds=tuple(float(v) for v in geometry.bounds), kind=kind, cells=cells)


# --- presets and files --------------------------------------------------------------------------

def _slugify(text: str) -> str:
    return grids.normalize_name(text).replace(" ", "-") or "region"


def _looks_like_path(text: str) -> bool:
    lowered = text.lower()
    return ("/" in text or "\\" in text or lowered.endswith(VECTOR_SUFFIXES)
            or Path(text).suffix.lower() in (".shp", ".gpkg", ".geojson"))


def _region_outline(text: str):
    if not text:
        raise TaxamapError(f"{option('region')} is empty; give a preset name (see "
                           f"{_presets_list()}) or a vector file")
    info = None if _looks_like_path(text) else grids.lookup(text)
    if info is not None:
        return (_as_polygonal(grids.get_region(info.name)), info.title or info.name,
                _slugify(info.name), info.kind)
    path = Path(text).expanduser()
    if path.exists():
        return _read_vector(path), path.stem, _slugify(path.stem.split(".")[0]), "file"
    if _looks_like_path(text):
        raise TaxamapError(f"region file {text} not found; check the path")
    raise TaxamapError(_unknown_message(text))


def _unknown_message(text: str) -> str:
    key = grids.normalize_name(text)
    candidates = grids.candidates(text)
    if candidates:
        order = {kind: i for i, kind in enumerate(grids.KINDS)}
        named = " or ".join(_described(c) for c in sorted(candidates,
                                                          key=lambda c: order.get(c.kind, 9)))
        return (f"region {text!r} is ambiguous: {named}; give one of those names or codes "
                f"(see {_presets_list()})")
    table = grids.aliases()
    close = difflib.get_close_matches(key, list(table), n=8, cutoff=0.6)
    names: list[str] = []
    for alias in close:
        if table[alias] not in names:
            names.append(table[alias])
    hint = f" (did you mean {' or '.join(repr(n) for n in names[:3])}?)" if names else ""
    return (f"unknown region {text!r}{hint}; see {_presets_list()}, or give a vector file "
            "(GeoJSON, GeoPackage, Shapefile)")


def _presets_list() -> str:
    """Where the caller finds the presets: the command, or the function in Python."""
    return "taxamap.regions()" if current() == "api" else "'taxamap regions'"


def _described(info: grids.RegionInfo) -> str:
    """A preset as a person tells it apart: "the US state 'Georgia (USA)' (GA)"."""
    what = grids.SUBDIVISION_WORDS.get(info.country, info.kind) if info.country else info.kind
    return f"the {what} {info.name!r}" + (f" ({info.code})" if info.code else "")


def _read_vector(path: Path):
    """Union of the polygons of the first layer of a vector file, reprojected to EPSG:4326."""
    import geopandas as gpd

    try:
        frame = gpd.read_file(path, columns=[])
    except Exception as exc:  # GDAL-derived errors of several types; all mean "unreadable"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TaxamapError(f"cannot read region file {path}: {detail}; give a GeoJSON, "
                           "GeoPackage or Shapefile with polygons") from None
    geoms = [g for g in frame.geometry if g is not None and not g.is_empty]
    vertices = int(shapely.get_num_coordinates(np.asarray(geoms, dtype=object)).sum())
    if vertices > MAX_REGION_VERTICES:
        raise TaxamapError(
            f"region file {path} has {vertices:,} vertices, more than the "
            f"{MAX_REGION_VERTICES:,} taxamap reads; simplify it to about the cell size you "
            f"map at, e.g. 'ogr2ogr -simplify 0.001 simpler.gpkg {path.name}' (degrees) or QGIS: "
            "Vector > Geometry Tools > Simplify")
    polygons = [p for g in geoms for p in _polygon_parts(_repaired(g, path))]
    if not polygons:
        raise TaxamapError(f"region file {path} has no polygons; give polygon features "
                           "(points and lines do not enclose an area)")
    geom = shapely.union_all(polygons)
    if frame.crs is None:
        minx, miny, maxx, maxy = geom.bounds
        if not (-360 <= minx and maxx <= 360 and -90 <= miny and maxy <= 90):
            raise TaxamapError(f"region file {path} has no CRS and its coordinates are not "
                               "longitude/latitude; save it with a CRS (e.g. a .prj file)")
        return _as_polygonal(geom)
    return _as_polygonal(geometry_to_lonlat(geom, frame.crs, f"region file {path}"))


#: A region file with more vertices than this is refused before any geometry work: checking and
#: repairing outlines costs time and memory with their size, and no grid needs such detail.
MAX_REGION_VERTICES = 500_000

#: An outline whose edges cross each other in more places than this is refused: the
#: cost of repairing grows with the crossings (a star of 1,000 vertices drawn with crossing edges
#: has ~500,000; GEOS's repair ran for minutes), while an outline with a few faults repairs at once.
MAX_REPAIR_CROSSINGS = 10_000

#: Pairs of edges with overlapping boxes :func:`edge_crossings` examines at most (its own bound),
#: and at most per query (its memory).
_MAX_EDGE_PAIRS = 20_000_000
_CHUNK_PAIRS = 1_000_000


def _repaired(geom, path: Path):
    """``geom`` made valid in bounded time (GEOS's "structure" repair: the area its rings
    enclose), or a TaxamapError when its edges cross too often to repair."""
    crossings = edge_crossings(geom, MAX_REPAIR_CROSSINGS)
    if crossings is None or crossings > MAX_REPAIR_CROSSINGS:
        raise TaxamapError(
            f"region file {path} has an outline that crosses itself in more than "
            f"{MAX_REPAIR_CROSSINGS:,} places (a self-intersecting polygon, such as a star drawn "
            "with crossing edges), more than taxamap repairs; redraw it so that its edges do not "
            "cross (QGIS: Vector > Geometry Tools > Check Validity shows where), or give --bbox "
            "instead")
    return shapely.make_valid(geom, method="structure")


def edge_crossings(geom, limit: int) -> int | None:
    """How many pairs of edges of ``geom``'s rings cross (each through the other's interior),
    counted up to just past ``limit``; None when that would mean examining more than
    :data:`_MAX_EDGE_PAIRS` pairs of edges (long tangled edges). Time and memory stay bounded
    however the edges cross, where GEOS's validity check and repair are not. Edges that only
    touch or overlap (parts sharing a border) add no vertex to a repair and are not counted."""
    coords, ring = shapely.get_coordinates(shapely.get_rings(shapely.get_parts(geom)),
                                           return_index=True)
    same_ring = ring[:-1] == ring[1:]  # edges join consecutive vertices of one ring
    start, end = coords[:-1][same_ring], coords[1:][same_ring]
    if len(start) < 3:
        return 0
    low, high = np.minimum(start, end), np.maximum(start, end)
    # An edge's box meets at most as many boxes as its x (or y) extent meets: cut the edges into
    # queries whose bounds add up to _CHUNK_PAIRS, so each query's pairs stay bounded.
    bound = np.minimum(_overlapping(low[:, 0], high[:, 0]), _overlapping(low[:, 1], high[:, 1]))
    total = np.cumsum(bound)
    cuts = np.searchsorted(total, np.arange(_CHUNK_PAIRS, total[-1], _CHUNK_PAIRS), "right")
    bounds = np.unique(np.concatenate([[0], cuts, [len(start)]]))
    edges = shapely.linestrings(np.stack([start, end], axis=1))
    tree = shapely.STRtree(edges)
    found = examined = 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mine, other = tree.query(edges[lo:hi])
        a, b = mine + lo, other
        a, b = a[b > a], b[b > a]  # each pair once
        examined += len(a)
        if examined > _MAX_EDGE_PAIRS:
            return None
        found += int(_segments_cross(start[a], end[a], start[b], end[b]).sum())
        if found > limit:
            return found
    return found


def _overlapping(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """For each interval [low, high], how many of the intervals overlap it (itself included)."""
    return (np.searchsorted(np.sort(low), high, "right")
            - np.searchsorted(np.sort(high), low, "left"))


def _segments_cross(p, q, r, s) -> np.ndarray:
    """Whether segments p-q and r-s (rows of (k, 2) arrays) cross: each has the other's ends
    strictly on either side (shared ends, touches and collinear overlaps do not count)."""
    def side(a, b, c):
        return np.sign((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1])
                       - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]))

    return (side(p, q, r) * side(p, q, s) < 0) & (side(r, s, p) * side(r, s, q) < 0)


# --- bounding boxes ----------------------------------------------------------------------------

_BBOX_EXAMPLE = "-125,24,-66,50"

_NUMBER = r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*"


def parse_bbox(bbox: Union[str, tuple, list]) -> BBox:
    """(west, south, east, north) from "W,S,E,N" or a 4-sequence; for a box across the
    antimeridian (W > E) east is returned as E + 360, so west < east always holds."""
    text = _bbox_text(bbox)
    if isinstance(bbox, str):
        match = re.fullmatch(",".join([_NUMBER] * 4), bbox.strip())
        if not match:
            raise TaxamapError(f"{option('bbox', text)} is not four numbers W,S,E,N in "
                               f"degrees, e.g. {option('bbox', _BBOX_EXAMPLE)}")
        values = [float(v) for v in match.groups()]
    else:
        try:
            values = [float(v) for v in bbox]
        except (TypeError, ValueError):
            values = []
        if len(values) != 4:
            raise TaxamapError(f"{option('bbox', text)} is not four numbers W,S,E,N in "
                               f"degrees, e.g. {option('bbox', _BBOX_EXAMPLE)}")
    west, south, east, north = values
    if not all(math.isfinite(v) for v in values):
        raise TaxamapError(f"{option('bbox', text)} has a non-finite number; give W,S,E,N in "
                           "degrees")
    if not (-90 <= south <= 90 and -90 <= north <= 90):
        raise TaxamapError(f"{option('bbox', text)}: latitudes must lie in [-90, 90]")
    if south >= north:
        raise TaxamapError(f"{option('bbox', text)}: south ({south:g}) must be less than north "
                           f"({north:g}); the order is W,S,E,N")
    if not (-180 <= west <= 180 and -180 <= east <= 180):
        raise TaxamapError(f"{option('bbox', text)}: longitudes must lie in [-180, 180] (for a "
                           "box across the antimeridian give W > E, e.g. 170,-20,-170,10)")
    if west > east:
        east += 360.0
    if west == east or east - west == 360.0 and west == 180.0:
        # 180 and -180 are the same meridian: "180,S,-180,N" is as empty as "10,S,10,N".
        raise TaxamapError(f"{option('bbox', text)}: west and east are the same meridian; the "
                           "box has no width")
    return (west, south, east, north)


def _bbox_text(bbox) -> str:
    if isinstance(bbox, str):
        return bbox.strip()
    try:
        return ",".join(f"{float(v):g}" for v in bbox)
    except (TypeError, ValueError):
        return str(bbox)


def _bbox_geometry(bbox):
    west, south, east, north = parse_bbox(bbox)
    shown_east = east - 360.0 if east > 180 else east
    slug = "_".join(f"{v:g}" for v in (west, south, shown_east, north))
    return shapely.box(west, south, east, north), slug


# --- longitude frames and land -----------------------------------------------------------------

def _polygon_parts(geom) -> list:
    return [p for p in shapely.get_parts(geom) if p.geom_type == "Polygon" and not p.is_empty]


def _as_polygonal(geom):
    parts = _polygon_parts(geom)
    if not parts:
        return shapely.MultiPolygon()
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


def _shift(geom, dx: float):
    return shapely.transform(geom, lambda xy: xy + np.array([dx, 0.0]))


def _intersect_any_frame(geom, other):
    """``geom`` & ``other`` where either may be written in a frame shifted by 360 degrees."""
    pieces = []
    for k in (-1, 0, 1):
        shifted = _shift(geom, 360.0 * k) if k else geom
        if shapely.intersects(shifted, other):
            pieces.extend(_polygon_parts(shapely.intersection(shifted, other)))
    if len(pieces) > 1:
        return _as_polygonal(shapely.union_all(pieces))
    return _as_polygonal(shapely.MultiPolygon(pieces))


def _compact_frame(geom):
    """Move pieces by 360 degrees so the geometry's longitude span is as small as possible.

    Natural Earth splits features at +/-180 (Fiji spans -180..180 as two pieces); shifting the
    smaller side across gives one continuous frame (Fiji 177..182) and a compact grid.
    """
    minx, _, maxx, _ = geom.bounds
    if geom.is_empty or maxx - minx <= 180 or minx < -180 or maxx > 180:
        return geom
    parts = _polygon_parts(geom)
    bounds = shapely.bounds(parts)
    order = np.argsort(bounds[:, 0])
    # Merge the parts' longitude intervals and find the widest empty gap between them.
    merged: list[list[float]] = []
    for i in order:
        lo, hi = bounds[i, 0], bounds[i, 2]
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    wrap_gap = 360.0 - (merged[-1][1] - merged[0][0])
    gaps = [(merged[i + 1][0] - merged[i][1], merged[i][1], merged[i + 1][0])
            for i in range(len(merged) - 1)]
    if not gaps:
        return geom
    width, gap_west, gap_east = max(gaps)
    if width <= wrap_gap + 1.0:
        return geom
    west_side = [p for p, b in zip(parts, bounds) if b[2] <= gap_west]
    east_side = [p for p, b in zip(parts, bounds) if b[0] >= gap_east]
    # Move whichever side is smaller, so most of the region keeps its usual coordinates.
    if sum(p.area for p in west_side) <= sum(p.area for p in east_side):
        moved = [_shift(p, 360.0) for p in west_side] + east_side
    else:
        moved = west_side + [_shift(p, -360.0) for p in east_side]
    return _as_polygonal(shapely.MultiPolygon(moved))


@functools.lru_cache(maxsize=1)
def _land_index():
    parts = np.asarray(shapely.get_parts(grids.land()))
    return parts, shapely.STRtree(parts)


def land_within(west: float, south: float, east: float, north: float):
    """The land mask (Natural Earth 1:50m land minus 1:50m lakes) inside a box, in the box's
    longitude frame (the box may extend past +/-180; land beyond it is the land at lon -/+ 360)."""
    parts, tree = _land_index()
    pieces = []
    for k in (-1, 0, 1):
        lo, hi = max(west - 360.0 * k, -180.0), min(east - 360.0 * k, 180.0)
        if lo >= hi:
            continue
        window = shapely.box(lo, south, hi, north)
        inside = tree.query(window, predicate="contains")
        touching = np.setdiff1d(tree.query(window, predicate="intersects"), inside)
        found = list(parts[inside])
        if len(touching):
            for clipped in shapely.intersection(parts[touching], window):
                found.extend(_polygon_parts(clipped))
        pieces.extend(_shift(p, 360.0 * k) if k else p for p in found)
    if not pieces:
        return shapely.MultiPolygon()
    if west < -180 or east > 180:
        # Land split at +/-180 comes back as touching pieces: dissolve them into one.
        return _as_polygonal(shapely.union_all(pieces))
    return shapely.MultiPolygon(pieces)


def _on_land(outline, is_box: bool):
    if outline.is_empty:
        return outline
    land = land_within(*outline.bounds)
    if is_box or land.is_empty:
        # land_within already clipped to the box, which is the whole region.
        return land
    return _as_polygonal(shapely.intersection(outline, land))


def _in_water(outline):
    """The part of ``outline`` off the land mask: ocean and lakes, in the outline's frame."""
    if outline.is_empty:
        return outline
    land = land_within(*outline.bounds)
    if land.is_empty:
        return outline
    return _as_polygonal(shapely.difference(outline, land))
