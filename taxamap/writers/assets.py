"""Offline copies of the JavaScript/CSS that folium's maps load from CDNs, for self-contained HTML.

The files come from two PyPI packages installed with ``pip install 'taxamap[offline]'``:
XStatic-Leaflet (Leaflet's own ``dist/`` files; Leaflet is BSD-2-Clause) and
XStatic-Leaflet-MarkerCluster (Leaflet.markercluster's ``dist/``; MIT). Nothing is vendored in
this repository. :func:`inline_assets` swaps each ``<script src>``/``<link href>`` of a rendered
page for the file's text (images its CSS refers to become data URIs) and adds the licence
notices, so the page opens with no network at all.
"""

from __future__ import annotations

import base64
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from taxamap.errors import TaxamapError
from taxamap.surface import option

#: What a user runs to get the offline assets (the extra pulls in the XStatic packages below).
INSTALL_HINT = ("pip install 'taxamap[offline]' (or: pip install XStatic-Leaflet "
                "XStatic-Leaflet-MarkerCluster)")

_BSD2 = """\
Redistribution and use in source and binary forms, with or without modification, are permitted
provided that the following conditions are met:
1. Redistributions of source code must retain the above copyright notice, this list of conditions
   and the following disclaimer.
2. Redistributions in binary form must reproduce the above copyright notice, this list of
   conditions and the following disclaimer in the documentation and/or other materials provided
   with the distribution.
THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR
IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND
FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR
CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE,
DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY,
WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY
WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE."""

_MIT = """\
Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:
The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT
OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE."""


@dataclass(frozen=True)
class Library:
    """One JavaScript library as an installed XStatic package ships it."""

    name: str
    module: str  # the XStatic module holding the files
    package: str  # its PyPI distribution
    license: str  # SPDX identifier of the library (the XStatic package says "same as")
    copyright: str
    license_text: str
    files: tuple[str, ...]  # file names under the package's data folder that pages may load
    version: str = ""
    package_version: str = ""
    folder: Path = field(default=Path("."))

    def notice(self) -> str:
        """The copyright line, licence and origin, as a plain-text block."""
        return (f"{self.name} {self.version} ({self.license}), embedded from the PyPI package "
                f"{self.package} {self.package_version}\n{self.copyright}\n{self.license_text}")


LIBRARIES = (
    Library(
        name="Leaflet", module="xstatic.pkg.leaflet", package="XStatic-Leaflet",
        license="BSD-2-Clause",
        copyright="Copyright (c) 2010-2022, Vladimir Agafonkin; Copyright (c) 2010-2011, "
                  "CloudMade. All rights reserved.",
        license_text=_BSD2, files=("leaflet.js", "leaflet.css"),
    ),
    Library(
        name="Leaflet.markercluster", module="xstatic.pkg.leaflet_markercluster",
        package="XStatic-Leaflet-MarkerCluster", license="MIT",
        copyright="Copyright 2012 David Leaver",
        license_text=_MIT,
        files=("leaflet.markercluster.js", "MarkerCluster.css", "MarkerCluster.Default.css"),
    ),
)


def offline_libraries() -> list[Library]:
    """The libraries with their installed folders and versions filled in.

    Raises TaxamapError naming what to install when a package (or one of its files) is missing.
    """
    found = []
    for lib in LIBRARIES:
        try:
            mod = importlib.import_module(lib.module)
        except ImportError:
            raise TaxamapError(f"{option('self-contained', True)} needs {lib.name}'s files from "
                               f"the {lib.package} package, which is not installed: "
                               f"{INSTALL_HINT}") from None
        folder = Path(mod.BASE_DIR)
        missing = [f for f in lib.files if not (folder / f).is_file()]
        if missing:
            raise TaxamapError(f"the installed {lib.package} lacks {', '.join(missing)}; "
                               f"reinstall it: {INSTALL_HINT}")
        found.append(Library(**{**lib.__dict__, "version": str(mod.VERSION),
                                "package_version": str(getattr(mod, "PACKAGE_VERSION", "")),
                                "folder": folder}))
    return found


def check_offline_assets() -> None:
    """Raise TaxamapError saying what to install unless every library a self-contained page
    embeds is installed with its files. Cheap (imports two small packages): callers run it before
    any long work, so a missing ``taxamap[offline]`` extra fails in a second, not at the end."""
    offline_libraries()


_CSS_URL = re.compile(r"""url\(\s*(['"]?)([^'")]+)\1\s*\)""")
_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".gif": "image/gif",
         ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def _css_with_data_uris(css: str, folder: Path) -> str:
    """``css`` with each relative ``url(...)`` of a file in ``folder`` replaced by a data URI."""

    def swap(match: re.Match) -> str:
        ref = match.group(2)
        if ref.startswith(("data:", "#")) or urlparse(ref).scheme:
            return match.group(0)
        target = (folder / ref).resolve()
        mime = _MIME.get(target.suffix.lower())
        if mime is None or not target.is_file():
            raise TaxamapError(f"cannot embed {ref} referenced by {folder}; reinstall: "
                               f"{INSTALL_HINT}")
        data = base64.b64encode(target.read_bytes()).decode("ascii")
        return f'url("data:{mime};base64,{data}")'

    return _CSS_URL.sub(swap, css)


def _script_text(js: str) -> str:
    # An HTML parser ends a script element at the first "</script", even inside a JS string.
    return re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)


_SCRIPT_TAG = re.compile(r"""<script\b[^>]*\bsrc\s*=\s*(["'])(?P<url>[^"']+)\1[^>]*>\s*</script>""",
                         re.IGNORECASE)
_LINK_TAG = re.compile(r"""<link\b[^>]*\bhref\s*=\s*(["'])(?P<url>[^"']+)\1[^>]*>""",
                       re.IGNORECASE)


def inline_assets(page: str, libraries: list[Library] | None = None) -> str:
    """Return ``page`` with every external script and stylesheet replaced by inline copies.

    Each URL is matched to a library file by its file name (so CDN hosts and versions in the URL
    do not matter). A script or stylesheet with no offline copy raises TaxamapError rather than
    leaving a page that silently needs the internet. Licence notices go in a comment at the top.
    """
    libraries = offline_libraries() if libraries is None else libraries
    by_name = {f: (lib, lib.folder / f) for lib in libraries for f in lib.files}
    used: list[Library] = []

    def lookup(url: str):
        name = Path(urlparse(url).path).name
        if name not in by_name:
            raise TaxamapError(f"{option('self-contained', True)} has no offline copy of {url}; "
                               "this is a taxamap bug, please report it (or write the map without "
                               f"{option('self-contained', True)})")
        lib, path = by_name[name]
        if lib not in used:
            used.append(lib)
        return lib, path

    def script(match: re.Match) -> str:
        lib, path = lookup(match.group("url"))
        text = _script_text(path.read_text(encoding="utf-8"))
        banner = f"/* {path.name}: {lib.name} {lib.version}, {lib.license} */"
        return f"<script>{banner}\n{text}\n</script>"

    def link(match: re.Match) -> str:
        tag = match.group(0)
        if not re.search(r"""\brel\s*=\s*["']?stylesheet""", tag, re.IGNORECASE):
            return tag
        lib, path = lookup(match.group("url"))
        css = _css_with_data_uris(path.read_text(encoding="utf-8"), path.parent)
        return f"<style>/* {path.name}: {lib.name} {lib.version}, {lib.license} */\n{css}\n</style>"

    page = _SCRIPT_TAG.sub(script, page)
    page = _LINK_TAG.sub(link, page)
    if used:
        notices = "\n\n".join(lib.notice() for lib in used).replace("--", "- -")
        comment = f"<!--\nThird-party software embedded in this file:\n\n{notices}\n-->\n"
        head = re.search(r"<head\b[^>]*>", page, re.IGNORECASE)
        at = head.end() if head else 0
        page = page[:at] + "\n" + comment + page[at:]
    return page


def external_urls(page: str) -> list[str]:
    """Scripts and stylesheets ``page`` would fetch from a network (http, https or //host)."""
    urls = [m.group("url") for m in _SCRIPT_TAG.finditer(page)]
    urls += [m.group("url") for m in _LINK_TAG.finditer(page)
             if re.search(r"""\brel\s*=\s*["']?stylesheet""", m.group(0), re.IGNORECASE)]
    urls += [m.group(2) for m in _CSS_URL.finditer(page)]
    return [u for u in urls if re.match(r"(?i)(https?:)?//", u.strip())]
