"""``taxamap`` as a user runs it: a subprocess of the CLI, offline."""

from __future__ import annotations

import os
import subprocess
import sys


def run(args, env_extra=None, cwd=None, timeout=300):
    """``python -m taxamap.cli ARGS`` with no network and no warnings; the finished process."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TAXAMAP_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "taxamap.cli", *args], capture_output=True, text=True, env=env,
        cwd=cwd, timeout=timeout,
    )
