"""The architecture's rules, checked on the source: methods are found through their kinds' registries, nothing
outside a method's file (or folder) names it, and the attention call reads no hidden state."""
import re
import sys
from pathlib import Path

import pytest

from attnswap.methods import kinds

PACKAGE = Path(__file__).resolve().parent.parent / "attnswap"
SOURCES = sorted(PACKAGE.rglob("*.py"))
METHODS = [(kind, name, cls) for kind, r in kinds().items() for name, cls in r.all().items()]


def home(cls) -> Path:
    """A method's own file, or its folder when it is a package."""
    path = Path(sys.modules[cls.__module__].__file__)
    return path.parent if path.name == "__init__.py" else path


@pytest.mark.parametrize("kind, name, cls", METHODS, ids=[f"{k}:{n}" for k, n, _ in METHODS])
def test_a_method_name_is_a_string_literal_only_in_its_own_file(kind, name, cls):
    own = home(cls)
    quoted = re.compile(r"""["']%s["']""" % re.escape(name))
    # another method's option values, declared as `Literal[...]` (MRA's approx_mode "sparse", the MRA paper's own
    # word), are that method's vocabulary, not a reference to a method: only those lines are not counted
    option_values = re.compile(r"""^\s*\w+: Literal\[[^\]]*\] = Field\(""")
    found = [f"{f.relative_to(PACKAGE)}:{i}" for f in SOURCES if f != own and own not in f.parents
             for i, line in enumerate(f.read_text().splitlines(), 1)
             if quoted.search(line) and not option_values.search(line)]
    assert found == []


def test_every_method_module_registers_one_method_of_its_kind():
    for kind, registry in kinds().items():
        for name, cls in registry.all().items():
            assert issubclass(cls, registry.base) and cls.kind == kind and cls.name == name
            assert cls.__doc__ or sys.modules[cls.__module__].__doc__, name  # the source paper, in the docstring


@pytest.mark.parametrize("pattern", [r"id\(module\)", r"_pending_cache", r"RECORDERS", r"HEAD_SCALES", r"PrivateAttr"])
def test_no_hidden_channels(pattern):
    hits = [f"{f.relative_to(PACKAGE)}:{i}" for f in SOURCES
            for i, line in enumerate(f.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert hits == []


def test_cma_es_comes_from_the_library():
    source = (PACKAGE / "methods" / "cache" / "cmaes.py").read_text()
    assert "from cmaes import CMA" in source and "def _update" not in source and "eigh" not in source


@pytest.mark.parametrize("kind, name, cls", METHODS, ids=[f"{k}:{n}" for k, n, _ in METHODS])
def test_every_method_has_a_readme_row_and_a_docs_page(kind, name, cls):
    root = PACKAGE.parent
    rows = [line for line in (root / "README.md").read_text().splitlines() if line.startswith("| [") and
            f"`{name}`" in line]
    assert rows, f"README has no row for {name}"
    pages = [p for p in (root / "docs" / "methods").glob("*.md") if f"`{name}`" in p.read_text()]
    assert pages, f"no page in docs/methods mentions {name}"


def test_every_package_folder_is_listed_for_the_wheel():
    """pyproject lists packages by hand: a new folder left out installs nowhere but an editable checkout."""
    import tomllib

    root = PACKAGE.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for top in ("attnswap", "attnswap_kernels")
             for p in (root / top).rglob("__init__.py")}
    assert found - listed == set()
