"""Helpers for the reliability tests: run attnswap in a child process, at a named fault point
(attnswap/faults.py), and look at what it left on disk."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from attnswap import outputs

REPO = Path(__file__).resolve().parents[1]


def child_env(fault: str | None = None, fault_dir: Path | None = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNSWAP_FAULT")}
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), **extra)
    if fault:
        env["ATTNSWAP_FAULT"] = fault
    if fault_dir:
        env["ATTNSWAP_FAULT_DIR"] = str(fault_dir)
    return env


def attnswap_child(*args, fault: str | None = None, fault_dir: Path | None = None, wait: bool = True,
                   cwd: Path | None = None, **extra):
    """`python -m attnswap ARGS` in a child process; with a fault like 'convert.swap' (kill by default)."""
    cmd = [sys.executable, "-m", "attnswap", *[str(a) for a in args]]
    env = child_env(fault, fault_dir, **extra)
    if not wait:
        # SIGINT as a terminal sends it: a runner started in the background (CI) passes SIGINT on as ignored
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def wait_reached(fault_dir: Path, proc, timeout: float = 240) -> None:
    """Wait until a child holding at a 'hold' fault point has reached it."""
    deadline = time.monotonic() + timeout
    while not (fault_dir / "reached").exists():
        if proc.poll() is not None:
            raise AssertionError(f"child ended ({proc.returncode}) before the fault point: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("child never reached the fault point")
        time.sleep(0.05)


def scratch(parent: Path) -> list[str]:
    """attnswap's scratch entries in a folder: staging, set-aside old outputs, locks (run dirs excepted)."""
    return sorted(p.name for p in parent.iterdir()
                  if ".attnswap-" in p.name and not p.name.endswith(".attnswap-run"))


def whole(target: Path) -> bool:
    """The target is a complete output: its manifest lists exactly its files, with their checksums."""
    if outputs.verify(target) is not None:
        return False
    try:
        outputs.check_owned(target)
    except Exception:  # noqa: BLE001  (a file the manifest does not list)
        return False
    return True


def config_section(target: Path) -> dict:
    return json.loads((target / "config.json").read_text()).get("attnswap", {})
