"""Writing and reading checkpoint directories; how they reach the disk safely is `outputs.writing`."""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn

from . import outputs
from .errors import AttnswapError


def _plain_state_dict(peft_model) -> dict:
    """The base model's tensors without LoRA: `x.base_layer.weight` -> `x.weight`, lora_* dropped."""
    sd = peft_model.get_base_model().state_dict()
    return {k.replace(".base_layer.", "."): v for k, v in sd.items() if "lora_" not in k}


def write_model(model: nn.Module, directory: Path, tokenizer=None, max_shard_size: str = "2GB") -> None:
    """save_pretrained into an existing directory; a PEFT model's LoRA goes to `adapter/` beside the base."""
    if hasattr(model, "peft_config"):
        base = model.get_base_model()
        base.save_pretrained(directory, state_dict=_plain_state_dict(model), max_shard_size=max_shard_size)
        model.save_pretrained(directory / "adapter")
    else:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save(model: nn.Module, out: str | os.PathLike, *, tokenizer=None, force: bool = False,
         files: dict[str, str] | None = None, protect=(), label: str = "save") -> Path:
    """Write a loadable checkpoint directory (safetensors + config.json with the `attnswap` section), whole
    or not at all: built beside `out` and swapped in (`outputs.writing`); `force` replaces only an output
    attnswap wrote. `protect`: inputs `out` may not be or contain (`outputs.inputs`)."""
    check_finite(model)
    with outputs.writing(out, force=force, protect=protect, label=label) as tmp:
        write_model(model, tmp, tokenizer)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return outputs.user_path(out)


def first_non_finite(tensors) -> str | None:
    """The name of the first floating tensor holding NaN/inf in (name, tensor) pairs, or None."""
    import torch

    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_finite(model: nn.Module, what: str = "the model") -> None:
    """Refuse to save non-finite weights: a checkpoint that loads is a checkpoint that works."""
    from .errors import NumericalError

    bad = first_non_finite(model.state_dict().items())
    if bad is not None:
        raise NumericalError(f"{what} has non-finite values in '{bad}'; nothing was written")


def read_metrics(directory: str | os.PathLike) -> dict:
    """The measurements recorded beside a checkpoint (`metrics.json`), or {}."""
    path = Path(directory) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    return sorted(directory.glob("*.safetensors"))


def load_method_tensors(model: nn.Module, directory: Path, legacy_prefix: str | None = None) -> None:
    """Load the tensors the plan's methods own (`...attnswap.*`, `...attnswap_cache.*`, `...attnswap_tuner.*`),
    which the base class does not know about. `legacy_prefix`: a 0.1.0 checkpoint keeps them all under
    `.attnswap.`; they load into that submodule instead (`plan.legacy_tensor_prefix`)."""
    from .surgery import OWN

    wanted = {k: v for k, v in model.state_dict().items() if any(o in k for o in OWN)}
    if not wanted:
        return
    legacy = (lambda k: k.replace(".attnswap.", f".{legacy_prefix}.")) if legacy_prefix else (lambda k: k)
    # a checkpoint of the bare backbone loaded under a head (a classifier) names its tensors without the head
    # model's backbone prefix (`encoder.layer.0...` for `bert.encoder.layer.0...`), and the other way round
    prefix = getattr(model, "base_model_prefix", "") + "."

    def rename(k: str) -> str:
        k = legacy(k)
        if k in wanted or prefix == ".":
            return k
        return prefix + k if prefix + k in wanted else k.removeprefix(prefix)

    found = {}
    try:
        for f in _safetensors_files(directory):
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    if rename(k) in wanted:
                        found[rename(k)] = st.get_tensor(k)
    except (SafetensorError, OSError) as e:
        raise AttnswapError(f"cannot read checkpoint '{directory}': {e}") from None
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise AttnswapError(f"checkpoint '{directory}' lacks {len(missing)} tensors of its plan's methods, e.g. "
                            f"'{missing[0]}'")
    model.load_state_dict(found, strict=False)
