"""What the CLI shows on stderr from the library's logging: the pipeline's progress lines, and
only warnings from the modules' own loggers (an offline service skipped is not news)."""

from __future__ import annotations

import logging

from taxamap import cli


def test_cli_shows_progress_and_warnings_but_not_module_details(capsys):
    cli._install_logging()
    cli._install_logging()  # twice: still one handler
    logging.getLogger("taxamap").info("region usa: 81,541 cells")
    logging.getLogger("taxamap.taxonomy").info(
        "taxonomy lookup failed, trying the next source: gaierror")
    logging.getLogger("taxamap.taxonomy").warning("iNaturalist answered HTTP 502")
    err = capsys.readouterr().err.splitlines()
    assert err == ["region usa: 81,541 cells", "iNaturalist answered HTTP 502"]
