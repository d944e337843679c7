"""The modality registry: per cell modality, what keys its stored embeddings, how its encoder
loads and which source feeds it.

A :class:`ModalityPlan` is known without loading any weights (the model ref and the source
settings key the store); its ``build`` loads the encoder only when cells actually need embedding,
so a warm query never imports torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from taxamap.errors import TaxamapError
from taxamap.models.precision import cell_precision
from taxamap.paths import cache_subdir
from taxamap.surface import option

log = logging.getLogger("taxamap")

#: On CUDA, compile the satellite encoder when at least this many cells are to be embedded (the
#: ~25 s compile pays for itself at ~11 k vs ~8 k tiles/s on an H100).
COMPILE_MIN_CELLS = 200_000


@dataclass
class ModalityPlan:
    """What identifies a modality's embeddings (model ref, source settings) and how to build its
    :class:`~taxamap.engine.CellEmbedder`."""

    modality: str
    model_ref: str
    source: dict
    build: Callable[[], object]
    attribution: str | None = None
    license: str | None = None
    stats: object | None = None
    #: The source object feeding the encoder (a satellite source's ``fetch`` returns the exact
    #: patches it was given), where the modality has one.
    data_source: object | None = None
    #: The encoder's forward precision ("fp32" or "bf16-mixed", :mod:`taxamap.models.precision`):
    #: part of the store's key and of the maps' tags.
    precision: str = "fp32"


#: A plan builder: (options, TaxaBind config, device getter, number of cells) -> plan.
PlanBuilder = Callable[[Any, dict, Callable[[], str], int], ModalityPlan]


def _model_ref(options, config: dict, key: str, files) -> str:
    from taxamap.models import hub

    return hub.resolve(hub.encoder_repo(config, key), files, models_dir=options.models).ref


def _location_plan(options, config: dict, device: Callable[[], str], n_cells: int) -> ModalityPlan:
    from taxamap import engine
    from taxamap.models.location import CONFIG_KEY, LOCATION_FILES, load_location_encoder

    precision = cell_precision(options.precision, options.device, device)
    return ModalityPlan(
        "location", _model_ref(options, config, CONFIG_KEY, LOCATION_FILES), {"kind": "coordinates"},
        lambda: engine.location_embedder(
            load_location_encoder(options.models, device=device(), config=config,
                                  precision=precision)),
        precision=precision,
    )


def _satellite_plan(options, config: dict, device: Callable[[], str], n_cells: int) -> ModalityPlan:
    from taxamap import engine
    from taxamap.models.satellite import CONFIG_KEY, FILES, load_satellite_encoder
    from taxamap.sources.satellite import make_satellite_source

    source = make_satellite_source(
        options.sat_source, url=options.sat_url, zoom=options.sat_zoom, size=options.sat_size,
        footprint_m=options.sat_footprint, file=options.sat_file, ee_project=options.ee_project, year=options.sat_year,
        cache_dir=cache_subdir("tiles", options.cache), workers=options.workers,
    )
    return ModalityPlan(
        "satellite", _model_ref(options, config, CONFIG_KEY, FILES), source.describe(),
        lambda: engine.satellite_embedder(load_satellite_encoder(
            options.models, device=device(), config=config,
            compile=device().startswith("cuda") and n_cells >= COMPILE_MIN_CELLS,
        ), source),
        attribution=getattr(source, "attribution", None),
        license=getattr(source, "license", None),
        stats=getattr(source, "stats", None),
        data_source=source,
    )


def _environment_plan(options, config: dict, device: Callable[[], str],
                      n_cells: int) -> ModalityPlan:
    from taxamap import engine
    from taxamap.models.environment import CONFIG_KEY, FILES, load_environment_encoder
    from taxamap.sources.worldclim import WorldClimFeatures

    if not options.worldclim and not options.env_array:
        raise TaxamapError(
            "the environment modality needs climate data: pass "
            f"{option('worldclim', metavar='DIR')} (fill it once with 'taxamap data worldclim "
            "DIR') or "
            f"{option('env-array', 'bioclim_elevation_scaled.npy')}"
        )
    features = WorldClimFeatures(options.worldclim, env_array=options.env_array)
    precision = cell_precision(options.precision, options.device, device)
    return ModalityPlan(
        "environment", _model_ref(options, config, CONFIG_KEY, FILES), features.describe(),
        lambda: engine.environment_embedder(
            load_environment_encoder(options.models, device=device(), config=config,
                                     precision=precision),
            features),
        precision=precision,
    )


#: Cell modalities in GeoTIFF band order (after the fused band).
MODALITIES: dict[str, PlanBuilder] = {
    "location": _location_plan,
    "satellite": _satellite_plan,
    "environment": _environment_plan,
}


def list_modalities() -> list[str]:
    """Names of the cell modalities, in band order."""
    return list(MODALITIES)


def get_modality(name: str) -> PlanBuilder:
    """The plan builder of modality ``name``; TaxamapError naming the choices otherwise."""
    try:
        return MODALITIES[name]
    except KeyError:
        raise TaxamapError(f"unknown modality {name!r}; choose from "
                           f"{','.join(MODALITIES)}") from None


def plan_modality(name: str, options, config: dict, device: Callable[[], str],
                  n_cells: int = 0) -> ModalityPlan:
    """The plan of modality ``name`` for grid ``options`` (resolves refs; loads no weights)."""
    return get_modality(name)(options, config, device, n_cells)


def build_embedder(name: str, options, config: dict, device: str, n_cells: int = 0):
    """The embedder of modality ``name`` (loads its encoder on ``device``)."""
    return plan_modality(name, options, config, lambda: device, n_cells).build()


_NOTICES_SHOWN: set[str] = set()


def licence_notice(attribution: str | None, license_: str | None) -> None:
    """Say once per process which imagery licence the outputs inherit."""
    if license_ and license_ not in _NOTICES_SHOWN:
        _NOTICES_SHOWN.add(license_)
        log.info(f"imagery: {attribution} -- licence {license_}. Maps made from it carry this "
                 "notice (GeoTIFF tags, HTML attribution, PNG footer); non-commercial licences "
                 "apply to them.")
