"""Queries: species names (or a species file, a photo, a recording) -> embedded query vectors.

Names resolve to seven-rank prompts through the taxonomy (:mod:`taxamap.taxonomy`); prompts go
through the text encoder in batches, photos through CLIP, recordings through CLAP. The encoders
load on first use and stay loaded in a :class:`QueryEncoders` (the web app keeps one).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from taxamap.errors import ModelFilesMissing, TaxamapError
from taxamap.naming import file_digest, file_slug, slugify
from taxamap.paths import cache_subdir
from taxamap.surface import accepts, option

if TYPE_CHECKING:  # pragma: no cover
    from taxamap.options import GridOptions, PredictOptions


_logger = logging.getLogger("taxamap")


def log(message: str) -> None:
    """Progress and facts for the user (the CLI shows them on stderr)."""
    _logger.info(message)


@dataclass
class Query:
    """One thing to map: its embedding, the prompt it came from, a label and a file slug."""

    vector: np.ndarray
    prompt: str | None
    label: str
    slug: str
    source: str


def read_species_file(path: str | os.PathLike) -> list[str]:
    """Names from a text file (one per line, '#' comments) or a CSV with a ``species`` column."""
    import csv

    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise TaxamapError(f"cannot read --species-file {path}: {exc.strerror or exc}") from exc
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if lines and "species" in [c.strip().lower() for c in next(csv.reader([lines[0]]))]:
        rows = list(csv.DictReader(lines))
        key = next(k for k in rows[0].keys() if k and k.strip().lower() == "species") if rows else None
        names = [r[key].strip() for r in rows if key and r.get(key) and r[key].strip()]
    else:
        names = [ln.strip() for ln in lines]
    names = list(dict.fromkeys(names))
    if not names:
        raise TaxamapError(f"--species-file {path} names no species (one per line, or a CSV "
                           "with a 'species' column)")
    return names


#: Messages and log lines quote at most this many names of a list (unknown species), then
#: give the count: a file of 100,000 misspelt names is one readable line, not megabytes.
NAMES_SHOWN = 10


def listed_names(names: list[str], limit: int = NAMES_SHOWN) -> str:
    """The first ``limit`` names quoted (each cut at 60 characters), then how many more."""
    shown = ", ".join('"' + (n if len(n) <= 60 else n[:57] + "...") + '"' for n in names[:limit])
    rest = len(names) - limit
    return f"{shown} and {rest:,} more" if rest > 0 else shown


def resolve_species_file(names: list[str], source: str, cache: Path | None,
                         skip_unknown: bool = False) -> tuple[list, list[str]]:
    """Resolve every name of a species file; returns (taxa, names skipped).

    Every name is tried before anything fails, so one message counts all the unknown (or
    malformed) ones and quotes the first :data:`NAMES_SHOWN`; with ``skip_unknown`` those are
    returned as skipped instead, unless none resolves.
    """
    from taxamap.taxonomy import resolve_species

    taxa, unknown = [], []
    for name in names:
        try:
            taxa.append(resolve_species(name, cache_dir=cache, suggest=False))
        except TaxamapError:
            unknown.append(name)
    if not unknown:
        return taxa, []
    listed = listed_names(unknown)
    if not taxa:
        raise TaxamapError(
            f"none of the {len(names):,} species in {source} could be resolved "
            f"({listed}); check the spelling, or give all seven ranks per line "
            '("Kingdom Phylum Class Order Family Genus epithet")'
        )
    if not skip_unknown:
        raise TaxamapError(
            f"{len(unknown):,} of {len(names):,} species in {source} are unknown: "
            f"{listed}; fix their spelling, give all seven ranks ('Kingdom Phylum Class Order "
            "Family Genus epithet'), remove them, or pass --skip-unknown to map the others"
        )
    log(f"skipping {len(unknown):,} unknown species of {len(names):,}: {listed}")
    return taxa, unknown


#: The options that name a query, with their placeholders.
QUERY_OPTIONS = (("species", "NAME"), ("species-file", "FILE"), ("image", "PATH"),
                 ("audio", "PATH"))


class QueryEncoders:
    """The query encoders of a request (text, photo, sound), each loaded on first use and kept:
    :func:`embed_queries` makes a fresh one per call; a long-lived caller (the web app's
    :class:`~taxamap.session.MapSession`) keeps one, so every encoder loads once per process."""

    def __init__(self, options: GridOptions, config: dict, device: Callable[[], str]):
        import threading

        self.options, self.config, self.device = options, config, device
        self._loaded: dict = {}
        self._lock = threading.Lock()

    def _get(self, key, load):
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = load()
            return self._loaded[key]

    def text(self, n_prompts: int = 1):
        """The text encoder (NumPy for a few prompts, torch for many; see :func:`_text_encoder`)."""
        big = n_prompts >= TORCH_TEXT_MIN_PROMPTS
        return self._get(("text", big),
                         lambda: _text_encoder(self.options, self.config, self.device, n_prompts))

    def image(self):
        """The CLIP model that embeds photos."""
        from taxamap.models.clip import load_clip

        return self._get("image", lambda: load_clip(self.options.models, device=self.device(),
                                                    config=self.config))

    def audio(self):
        """The CLAP audio encoder that embeds recordings."""
        from taxamap.models.audio import load_audio_encoder

        return self._get("audio", lambda: load_audio_encoder(
            models_dir=self.options.models, device=self.device(), config=self.config))


def embed_queries(options: PredictOptions, config: dict, device: Callable[[], str],
                  skipped: list[str] | None = None,
                  encoders: QueryEncoders | None = None,
                  forward_lock=None, limit: Callable[[int], None] | None = None,
                  panel=None) -> tuple[list[Query], str]:
    """Embed the request's query or queries; returns them and the query encoder's ref.

    Every species prompt goes through the text encoder in one call. Names of a species file
    that ``options.skip_unknown`` leaves out are appended to ``skipped`` (when given). ``encoders``
    (kept by a long-lived caller) supplies already loaded encoders. A photo or a recording is
    decoded (and resized or resampled) first; only the encoder's own work (a recording's
    log-mel features, which seed NumPy's global RNG, and the forward pass) runs inside
    ``forward_lock`` (a context manager, e.g. a session's encoder lock), so decoding never
    holds up other queries. ``limit`` is called with the number of species once they are
    resolved, before any is embedded (it may refuse them). ``panel`` (a
    :class:`~taxamap.panel.product.GridPanel` holding its embeddings) answers species that are
    all its members from the panel cache, with no text encoding.
    """
    given = [x for x in (options.species, options.image, options.audio, options.species_file) if x]
    if len(given) != 1:
        queries = [option(name, metavar=metavar) for name, metavar in QUERY_OPTIONS
                   if accepts(name)]
        *first, last = list(dict.fromkeys(queries))  # the web page has one control for two
        raise TaxamapError(f"give exactly one query: {', '.join(first)} or {last}")
    encoders = encoders if encoders is not None else QueryEncoders(options, config, device)
    forward_lock = forward_lock if forward_lock is not None else contextlib.nullcontext()
    if options.audio:
        from taxamap.models.audio import load_audio, model_rate

        # Decoded (and resampled, its work bounded) first: a bad file fails before any model loads.
        wave, rate = load_audio(options.audio, target_rate=model_rate(config))
        encoder = encoders.audio()
        with forward_lock:
            vector = encoder.encode([(wave, rate)])[0]
        name = Path(options.audio).name
        slug = file_slug("audio", name, file_digest(options.audio))
        return [Query(np.asarray(vector), None, f"sound {name}", slug, "audio")], encoder.ref
    if options.image:
        from taxamap.models.preprocess import load_image

        image = load_image(options.image)
        clip = encoders.image()
        name = Path(options.image).name
        pixels = clip.preprocess([image])
        del image  # the decoded photo (up to 40 Mpx) is not kept while waiting for the lock
        with forward_lock:
            vector = clip.encode_pixels(pixels)[0]
        slug = file_slug("image", name, file_digest(options.image))
        return [Query(vector, None, f"image {name}", slug, "image")], clip.ref
    taxa = resolve_taxa(options, skipped)
    if limit is not None:
        limit(len(taxa))
    known = panel_queries(taxa, panel)
    if known is not None:
        return known, panel.text_ref
    text = encoders.text(n_prompts=len(taxa))
    return species_queries(taxa, text), text.ref


#: Prompts logged one line each; a longer species file logs the first ones and a count.
PROMPTS_LOGGED = 20


def resolve_taxa(options: PredictOptions, skipped: list[str] | None = None) -> list:
    """The request's species (``species`` or ``species_file``) resolved to taxa, each prompt
    once, in the given order; names a species file's ``skip_unknown`` leaves out are appended to
    ``skipped``."""
    from taxamap.taxonomy import resolve_species

    cache = cache_subdir("taxonomy", options.cache)
    if isinstance(options.species, str):
        resolved = [resolve_species(options.species, cache_dir=cache)]
    elif options.species:
        names = list(dict.fromkeys(str(n).strip() for n in options.species if str(n).strip()))
        resolved, left_out = resolve_species_file(names, "species=[...]", cache, False)
    else:
        resolved, left_out = resolve_species_file(read_species_file(options.species_file),
                                                  f"--species-file {options.species_file}", cache,
                                                  options.skip_unknown)
        if skipped is not None:
            skipped.extend(left_out)
    taxa, seen = [], set()
    for taxon in resolved:
        if taxon.prompt in seen:  # spellings of one species would overwrite each other's files
            continue
        seen.add(taxon.prompt)
        if len(taxa) < PROMPTS_LOGGED:
            log(f"prompt: {taxon.prompt}  (taxonomy from {taxon.source})")
        taxa.append(taxon)
    if len(taxa) > PROMPTS_LOGGED:
        log(f"... and {len(taxa) - PROMPTS_LOGGED:,} more prompts: {len(taxa):,} species")
    return taxa


def species_queries(taxa: list, text) -> list[Query]:
    """The queries of ``taxa`` (see :func:`resolve_taxa`), their prompts embedded by ``text``."""
    vectors = text.encode_text([t.prompt for t in taxa])
    return [Query(v, t.prompt, t.binomial, slugify(t.binomial), t.source)
            for v, t in zip(vectors, taxa)]


def panel_queries(taxa: list, panel) -> list[Query] | None:
    """The queries of ``taxa`` with their prompt embeddings from a reference ``panel`` that
    holds every one of them (None otherwise: they are encoded)."""
    if panel is None or not panel.ready:
        return None
    vectors = [panel.vector_of(t.prompt) for t in taxa]
    if any(v is None for v in vectors):
        return None
    return [Query(v, t.prompt, t.binomial, slugify(t.binomial), t.source)
            for v, t in zip(vectors, taxa)]


#: Above this many prompts torch's faster kernels repay its ~1 s import; below, NumPy wins.
TORCH_TEXT_MIN_PROMPTS = 200


def _text_encoder(options: GridOptions, config: dict, device: Callable[[], str],
                  n_prompts: int = 1):
    """taxamap's own text tower (loads only the text weights, never imports open_clip: ~0.3 s
    instead of ~3 s); open_clip's full model for configurations it does not cover."""
    from taxamap.models.text import load_text_encoder

    # One prompt is microseconds of compute: run it on the CPU (NumPy, no torch import) unless
    # the user named a GPU.
    where = "cpu" if (options.device or "auto").lower() in ("auto", "cpu") else device()
    backend = "torch" if n_prompts >= TORCH_TEXT_MIN_PROMPTS else "auto"
    try:
        return load_text_encoder(options.models, device=where, config=config, backend=backend)
    except ModelFilesMissing:
        raise
    except TaxamapError as exc:
        from taxamap.models.clip import load_clip

        log(f"text encoder: using open_clip ({exc})")
        return load_clip(options.models, device=where, config=config)
