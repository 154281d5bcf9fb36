"""Named fault-injection points, for the tests of what a crash leaves on disk (docs/reliability.md).

Code that writes calls `point("output.swap")` etc. at the moments worth crashing in. Nothing happens unless
the environment variable ATTNSWAP_FAULT names that point:

    ATTNSWAP_FAULT=NAME[@N][:ACTION]      e.g. output.swap:kill, finetune.step@3:interrupt

fires at the N-th time (default 1) the process reaches NAME. Actions:
- kill (default): SIGKILL the process at once (no cleanup runs, as with the OOM killer or a power cut);
- interrupt: raise KeyboardInterrupt (what Ctrl-C does);
- enospc / eacces: raise the OSError a full disk / a permission problem raises;
- hold: create $ATTNSWAP_FAULT_DIR/reached and wait (up to 5 minutes) until $ATTNSWAP_FAULT_DIR/release
  exists, so a test can act while the process sits at a known point (a second writer, a real SIGINT).
"""
from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

_hits: dict[str, int] = {}


def _spec() -> tuple[str, int, str] | None:
    text = os.environ.get("ATTNSWAP_FAULT")
    if not text:
        return None
    where, _, action = text.partition(":")
    name, _, count = where.partition("@")
    return name, int(count or 1), action or "kill"


def point(name: str) -> None:
    """Reached a named moment; fail here if ATTNSWAP_FAULT says so."""
    spec = _spec()
    if spec is None or spec[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != spec[1]:
        return
    action = spec[2]
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "interrupt":
        raise KeyboardInterrupt
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<fault {name}>")
    elif action == "eacces":
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), f"<fault {name}>")
    elif action == "hold":
        folder = Path(os.environ["ATTNSWAP_FAULT_DIR"])
        (folder / "reached").write_text(str(os.getpid()))
        deadline = time.monotonic() + 300
        while not (folder / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        raise ValueError(f"ATTNSWAP_FAULT: unknown action '{action}' (kill, interrupt, enospc, eacces, hold)")
