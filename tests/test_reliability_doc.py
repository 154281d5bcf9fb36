"""docs/reliability.md names the test of each case: every id it names is a test of this suite."""
import re
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
    """Each documented function exists in its file, and each parameter id is one of its literal ids."""
    import ast

    ids = documented_ids()
    assert len(ids) >= 60, len(ids)
    missing = []
    for node in ids:
        path, _, test = node.partition("::")
        name, _, param = test.partition("[")
        source = (REPO / path).read_text()
        functions = {f.name for f in ast.walk(ast.parse(source)) if isinstance(f, ast.FunctionDef)}
        if name not in functions or (param and f'"{param.rstrip("]")}"' not in source):
            missing.append(node)
    assert not missing, missing
