import importlib
import pkgutil

from ..errors import AttnswapError, did_you_mean

VARIANTS: dict[str, type] = {}
_NOT_VARIANTS = {"base", "registry"}


def register(cls):
    """Class decorator: make a Variant subclass available by its `name`."""
    if cls.name in VARIANTS and VARIANTS[cls.name] is not cls:
        raise ValueError(f"variant name '{cls.name}' registered twice")
    VARIANTS[cls.name] = cls
    return cls


def _discover():
    # Importing a variant module registers it; adding a variant is adding a file to this package.
    from . import __path__ as pkg_path

    for info in pkgutil.iter_modules(pkg_path):
        if info.name not in _NOT_VARIANTS:
            importlib.import_module(f"{__package__}.{info.name}")


def all_variants() -> dict[str, type]:
    _discover()
    return dict(sorted(VARIANTS.items()))


def get_variant(name: str):
    variants = all_variants()
    if name not in variants:
        raise AttnswapError(
            f"unknown variant '{name}'{did_you_mean(name, variants)}; run 'attnswap list' to see all"
        )
    return variants[name]
