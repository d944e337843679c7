"""Options defined once: the CLI's arguments and the API's signatures come from the dataclasses."""

from __future__ import annotations

import inspect
from dataclasses import FrozenInstanceError, dataclass, fields

import pytest

import taxamap
from taxamap import cli
from taxamap.errors import TaxamapError
from taxamap.options import (FitOptions, GridOptions, MapOptions, PredictOptions, QueryOptions,
                             WriteOptions, add_options, flag_of, from_args, keywords, opt,
                             option_fields)


def _flags(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _subparser(name: str):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[name]


@pytest.mark.parametrize("command, classes", [
    ("predict", (QueryOptions, GridOptions, MapOptions, WriteOptions, FitOptions)),
    ("embed", (GridOptions,)),
    ("serve", (MapOptions,)),
])
def test_every_option_field_is_a_cli_flag(command, classes):
    flags = _flags(_subparser(command))
    missing = [flag_of(f) for f in option_fields(*classes)
               if f.metadata["cli"] and flag_of(f) not in flags]
    assert not missing


@pytest.mark.parametrize("function, classes", [
    (taxamap.predict, (QueryOptions, MapOptions, FitOptions)),
    (taxamap.embed, (GridOptions,)),
    (taxamap.open_session, (MapOptions,)),
    (taxamap.write, (WriteOptions,)),
])
def test_every_option_field_is_an_api_keyword_with_its_default(function, classes):
    params = inspect.signature(function).parameters
    for f in option_fields(*classes):
        assert f.name in params, f.name
        assert params[f.name].default == f.default, f.name


def test_a_new_option_is_one_field():
    """A field added to an options dataclass reaches the CLI, the API signature and the
    options the library receives, with nothing else to touch."""
    import argparse

    @dataclass(frozen=True, kw_only=True)
    class Extended(GridOptions):
        halo: int = opt(3, "where", "cells of margin around the region", metavar="N", parse=int)

    parser = argparse.ArgumentParser()
    add_options(parser, Extended)
    args = parser.parse_args(["--region", "ohio", "--halo", "5"])
    assert from_args(Extended, args).halo == 5

    @keywords(Extended)
    def api(**options):
        return Extended(**options)

    assert inspect.signature(api).parameters["halo"].default == 3
    assert api(region="ohio", halo=7).halo == 7
    with pytest.raises(TypeError, match="halo2"):
        api(halo2=1)


def test_cli_and_api_build_the_same_options():
    parser = cli.build_parser()
    argv = ["predict", "--species", "Cardinalis cardinalis", "--bbox=-84,39,-82,41",
            "--resolution", "0.05", "--modalities", "environment,location", "--cells", "all",
            "--fusion", "sum", "--no-progress", "--workers", "3"]
    from_cli = from_args(PredictOptions, parser.parse_args(argv))
    from_api = PredictOptions(species="Cardinalis cardinalis", bbox="-84,39,-82,41",
                              resolution=0.05, modalities=["location", "environment"],
                              cells="all", fusion="sum", progress=False, workers=3)
    assert from_cli == from_api
    assert from_api.modalities == ("location", "environment")  # band order, whatever was given


@pytest.mark.parametrize("given, wording", [
    ({"resolution": -0.1}, "resolution"),
    ({"resolution": "fine"}, "resolution"),
    ({"cells": "lakes"}, "land, water or all"),
    ({"modalities": "location,sound"}, "unknown modality sound"),
    ({"fusion": "max"}, "fusion"),
    ({"workers": 0}, "workers"),
    ({"sat_source": "ftp"}, "sat-source"),
    ({"fit": True}, "occurrences"),
    ({"background": "bg.csv"}, "fit"),
    ({"skip_unknown": True}, "species-file"),
])
def test_bad_options_are_one_line_errors(given, wording):
    with pytest.raises(TaxamapError, match=wording) as caught:
        PredictOptions(**given)
    assert "\n" not in str(caught.value)


def test_api_errors_name_keywords_and_the_cli_names_flags(tmp_path):
    with pytest.raises(TaxamapError, match=r"resolution=-1"):
        taxamap.predict("Cardinalis cardinalis", region="ohio", resolution=-1)
    code = cli.main(["predict", "--species", "x", "--region", "ohio", "--resolution=-1"])
    assert code == 2


def test_options_are_frozen_and_paths_are_strings(tmp_path):
    options = GridOptions(cache=tmp_path, modalities=("location",))
    assert options.cache == str(tmp_path)
    with pytest.raises(FrozenInstanceError):
        options.cache = "elsewhere"  # type: ignore[misc]
    assert {f.name for f in fields(MapOptions)} >= {f.name for f in fields(GridOptions)}
