"""Restart a single-process run in place when it dies (multi-process runs use torchrun's
--max-restarts instead). Each restart resumes from the newest good checkpoint by itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from keel.runlog import RunLog

USER_ERROR = 2  # bad input: restarting cannot help


def supervise(argv: list[str], max_restarts: int, out: Path) -> int:
    """Run `keel <argv> --resume` in a child process, restarting it up to `max_restarts` times."""
    rc = 0
    for attempt in range(max_restarts + 1):
        rc = subprocess.call([sys.executable, "-m", "keel", *argv, "--resume"])
        if rc in (0, USER_ERROR):
            return rc
        log = RunLog(out)
        log.event("restart", attempt=attempt + 1, exit_code=rc, max_restarts=max_restarts)
        log.close()
    return rc


def without_option(argv: list[str], name: str) -> list[str]:
    """argv minus `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out
