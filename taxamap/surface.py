"""Which surface a message speaks to, so errors name the caller's own parameters.

taxamap is used three ways: the CLI (``--species "..."``), the Python API (``species="..."``) and
the web page (the species box). A message that says how to fix a problem refers to an option
through :func:`option`, which renders it in the vocabulary of the surface now being served, and
offers only what that surface accepts (:func:`accepts`): the web page has no occurrence files, so
it is never told to give one.

The surface is a context variable set once at each entry point: the CLI's ``main``
(:func:`speaking_to` ``"cli"``), the public API functions (:func:`api_entry`, which keeps a
surface already set: the CLI and the web app call the API too) and the web app's request
handling (``"web"``). Without any, messages take the CLI's form.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator, TypeVar

#: The surfaces a message can speak to.
SURFACES = ("cli", "api", "web")

_SURFACE: contextvars.ContextVar[str | None] = contextvars.ContextVar("taxamap_surface",
                                                                     default=None)

#: Controls of the web page (taxamap/serve/static/index.html), by option name. Options without
#: a control are set by whoever started ``taxamap serve``: those keep the CLI's form.
WEB_CONTROLS = {
    "species": "the species box",
    "threshold": "the range slider",
    "band": "the layer menu",
    "stretch": "the stretch slider",
    "image": "the photo / recording button",
    "audio": "the photo / recording button",
}

#: API keyword names that are not the CLI name in snake_case.
API_NAMES = {"no-progress": "progress"}

#: CLI options with no keyword in the Python API.
CLI_ONLY = frozenset({"port", "host", "debug", "no-progress"})

F = TypeVar("F", bound=Callable[..., Any])


def current() -> str:
    """The surface being served: "cli" (also when none was set), "api" or "web"."""
    return _SURFACE.get() or "cli"


@contextlib.contextmanager
def speaking_to(surface: str) -> Iterator[None]:
    """Word the messages raised inside the block for ``surface`` ("cli", "api" or "web")."""
    if surface not in SURFACES:
        raise ValueError(f"surface must be one of {SURFACES}, not {surface!r}")
    token = _SURFACE.set(surface)
    try:
        yield
    finally:
        _SURFACE.reset(token)


def api_entry(func: F) -> F:
    """Decorate a public API function: its messages use keyword names, unless a surface is set
    already (the CLI and the web app reach the user through the same functions)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if _SURFACE.get() is not None:
            return func(*args, **kwargs)
        with speaking_to("api"):
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def accepts(name: str) -> bool:
    """Whether the current surface has option ``name`` (the CLI's long name, no dashes)."""
    surface = current()
    if surface == "web":
        return name in WEB_CONTROLS
    if surface == "api":
        return name not in CLI_ONLY
    return True


def option(name: str, value: Any = None, *, metavar: str | None = None) -> str:
    """Option ``name`` (the CLI's long name without dashes, e.g. ``"species-file"``) as the
    current surface spells it, with an example ``value`` or a placeholder ``metavar``.

    ``option("species", "Cardinalis cardinalis")`` is ``--species "Cardinalis cardinalis"`` on
    the CLI, ``species="Cardinalis cardinalis"`` in Python and ``"Cardinalis cardinalis" in the
    species box`` on the web page.
    """
    surface = current()
    if surface == "web" and name in WEB_CONTROLS:
        control = WEB_CONTROLS[name]
        return control if value is None else f"{_quoted(value)} in {control}"
    if surface == "api" and name not in CLI_ONLY:
        keyword = API_NAMES.get(name, name.replace("-", "_"))
        if value is not None:
            return f"{keyword}={_quoted(value)}"
        return f"{keyword}=..." if metavar else f"{keyword}="
    flag = f"--{name}"
    if value is True:
        return flag  # a switch
    if value is not None:
        shown = _quoted(value) if isinstance(value, str) and _needs_quotes(value) else value
        return f"{flag} {shown}"
    return f"{flag} {metavar}" if metavar else flag


def _needs_quotes(text: str) -> bool:
    return not text or any(c.isspace() or c in "\"'$&|;<>*?()[]{}" for c in text)


def _quoted(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    return str(value)


__all__ = ["SURFACES", "accepts", "api_entry", "current", "option", "speaking_to"]
