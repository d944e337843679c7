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


def test_a_library_logging_through_the_root_logger_does_not_double_every_line(capsys):
    """open_clip calls ``logging.info`` on the root logger when a photo query loads CLIP; with
    no handler on the root that runs ``logging.basicConfig()``, and every later line of the
    CLI (e.g. `taxamap serve` after one upload) was printed twice."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = []  # as outside pytest, whose own handlers sit on the root logger
    try:
        cli._install_logging()
        logging.info("Parsing model identifier. Schema: None")  # what open_clip does
        logging.getLogger("taxamap").info("prompt: Animalia Chordata Aves")
        logging.getLogger("taxamap.taxonomy").warning("iNaturalist answered HTTP 502")
    finally:
        root.handlers = saved
    err = capsys.readouterr().err.splitlines()
    assert err == ["prompt: Animalia Chordata Aves", "iNaturalist answered HTTP 502"]


def test_a_closed_pipe_ends_quietly():
    """`taxamap regions | head -1`: the reader leaves early; no BrokenPipe traceback."""
    import subprocess
    import sys

    proc = subprocess.run(f"{sys.executable} -m taxamap.cli regions | head -1", shell=True,
                          capture_output=True, text=True)
    assert proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
