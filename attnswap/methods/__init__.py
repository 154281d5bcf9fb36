"""Methods, in four kinds, each with its own small base class and registry (one file per method):

- `attention` (`AttentionMethod`): computes a layer's attention from its q, k, v;
- `cache` (`CachePolicy`): decides which KV entries a layer keeps during prefill and decoding;
- `tuners` (`Tuner`): adds trainable weight paths to a layer's projections;
- `scores` (`ScoreModifier`): changes the scores of a layer's softmax attention before the softmax.

A converted model carries a plan (`attnswap.plan`) that names methods of each kind. The CLI, the docs and the
tests find methods through `KINDS` and nothing else.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import AttnswapError, did_you_mean, first_validation_error


# the attribute of an attention module that holds each kind's instance (and so its state-dict prefix)
ATTRS = {"attention": "attnswap", "cache": "attnswap_cache", "tuner": "attnswap_tuner", "scores": "attnswap_scores"}


class Options(BaseModel):
    """Options of a method. Subclasses declare fields with `Field(description=...)`: that text is the help."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Method:
    """What every method of every kind declares: a name, a one-line summary, typed options, the attention
    directions it is defined for, and what it adds to a model."""

    kind: ClassVar[str]
    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    directions: ClassVar[frozenset[str]] = frozenset({"causal", "bidirectional"})
    adds: ClassVar[str] = "no new parameters"

    @classmethod
    def parse_options(cls, values: dict[str, Any]) -> Options:
        """Validate user options (strings from --set, or typed values from a plan, recipe or the API)."""
        fields = cls.Options.model_fields
        for key in values:
            if key not in fields:
                names = ", ".join(fields) or "(it has none)"
                raise AttnswapError(f"unknown option '{key}' for {cls.kind} method '{cls.name}'"
                                    f"{did_you_mean(key, fields)}; options: {names}")
        try:
            return cls.Options(**values)
        except ValidationError as e:
            loc, msg, given = first_validation_error(e)
            where = ".".join(str(p) for p in loc)
            raise AttnswapError(f"bad value for option '{where}' of {cls.kind} method '{cls.name}': {msg} "
                                f"(got {given!r})") from None

    @classmethod
    def check_supported(cls, adapter, options: Options | None = None) -> None:
        """Raise a one-line error if this method (with these options) cannot run on this architecture."""
        if adapter.direction not in cls.directions:
            raise AttnswapError(f"{cls.kind} method '{cls.name}' supports {'/'.join(sorted(cls.directions))} "
                                f"attention only, but {adapter.name} models are {adapter.direction}")

    @classmethod
    def prepare(cls, model, options: Options, layers: list[int], calibration=None) -> "Prepared":
        """Before the swap, on the original model: resolve options that come from measuring it or reading a
        file. Returns the options to store (fully resolved: loading a checkpoint never measures again), a
        record for the checkpoint's `attnswap` section and model card, and buffer values for every instance."""
        return Prepared(options)

    @classmethod
    def describe(cls, entry: dict, prepared: dict) -> list[str]:
        """Lines for the model card and `attnswap list SOURCE` about this method's entry of a plan."""
        return []

    @classmethod
    def reference_parameters(cls, geometry, adapter) -> int:
        """New trainable parameters of one layer with default options (for `attnswap list`)."""
        from ..arch import Site

        module = cls(cls.Options(), Site(0, "reference", None), geometry, adapter)
        return sum(p.numel() for p in module.trainable_parameters())


def require_calibration(calibration, what: str) -> None:
    """One-line error for a method whose `prepare` measures the model on calibration text it was not given."""
    if calibration is None:
        raise AttnswapError(f"{what} on calibration text: pass --calibration FILE (API: "
                            "calibration=attnswap.data.calibration(tokenizer, FILE))")


def calibration_lines(prepared: dict | None, what: str = "measured") -> list[str]:
    """`describe`'s line for a method that measured the model on calibration text (none if it did not)."""
    if not prepared or "calibration" not in prepared:
        return []
    c = prepared["calibration"]
    return [f"{what} on {c['tokens']} tokens of {c['data']} ({c['windows']} windows of {c['seq_len']})"]


class Prepared:
    """What `Method.prepare` resolved: options, a record of the measurement, tensor values to load into each
    layer's instance ({name: value} for every layer, or {layer index: {name: value}})."""

    def __init__(self, options: Options, record: dict | None = None, buffers: dict | None = None):
        self.options, self.record, self.buffers = options, record or {}, buffers or {}


class Registry:
    """Methods of one kind, by name; importing the kind's package modules registers them (adding a method is
    adding a file, or a folder, to that package)."""

    def __init__(self, kind: str, package: str, base: type):
        self.kind, self.package, self.base = kind, package, base
        self.methods: dict[str, type] = {}
        self._found = False

    def register(self, cls):
        """Class decorator: make a method available by its `name`."""
        if not issubclass(cls, self.base):
            raise TypeError(f"{cls.__name__} is not a {self.base.__name__}")
        if cls.name in self.methods and self.methods[cls.name] is not cls:
            raise ValueError(f"{self.kind} method name '{cls.name}' registered twice")
        cls.kind = self.kind
        self.methods[cls.name] = cls
        return cls

    def all(self) -> dict[str, type]:
        if not self._found:
            package = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{info.name}")
            self._found = True
        return dict(sorted(self.methods.items()))

    def get(self, name: str):
        methods = self.all()
        if name not in methods:
            raise AttnswapError(f"unknown {self.kind} method '{name}'{did_you_mean(name, methods)}; choose from "
                                f"{', '.join(methods)} (see 'attnswap list')")
        return methods[name]


def kinds() -> dict[str, Registry]:
    """kind -> registry: attention, cache, tuner, scores."""
    from .attention import REGISTRY as attention
    from .cache import REGISTRY as cache
    from .scores import REGISTRY as scores
    from .tuners import REGISTRY as tuners

    return {r.kind: r for r in (attention, cache, tuners, scores)}


def find(name: str) -> type:
    """The method called `name`, of whichever kind (names are unique across kinds)."""
    everything = {n: cls for r in kinds().values() for n, cls in r.all().items()}
    if name not in everything:
        raise AttnswapError(f"unknown method '{name}'{did_you_mean(name, everything)}; run 'attnswap list' to "
                            "see all")
    return everything[name]
