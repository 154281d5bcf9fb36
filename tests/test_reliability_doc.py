"""docs/reliability.md names the test of each case: every id it names is a test of this suite."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FILE = "tests/test_reliability.py"
FUNC = re.compile(r"^(?:(tests/\w+\.py)::)?(test_\w+)(\[[^\]]+\])?$")


def documented_ids() -> list[str]:
    """Node ids from the table cells: `test_x[a]`, then `[b]` means test_x[b]; default file test_reliability."""
    ids, last = [], None
    for line in (REPO / "docs" / "reliability.md").read_text().splitlines():
        if not line.startswith("|"):
            continue
        for token in re.findall(r"`([^`]+)`", line.split("|")[-2]):
            if token.startswith("[") and last:
                ids.append(f"{last}{token}")
                continue
            m = FUNC.match(token)
            if m:
                path = m.group(1) or ("tests/test_faults.py" if "killed" in m.group(2) else DEFAULT_FILE)
                last = f"{path}::{m.group(2)}"
                ids.append(last + (m.group(3) or ""))
    return ids


def test_every_documented_test_id_exists():
    ids = documented_ids()
    assert len(ids) >= 60, len(ids)
    files = sorted({i.split("::")[0] for i in ids})
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                               cwd=REPO, capture_output=True, text=True, timeout=300).stdout.splitlines()
    known = set(collected) | {c.split("[")[0] for c in collected}
    missing = [i for i in ids if i not in known]
    assert not missing, missing
