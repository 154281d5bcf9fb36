"""Writing checkpoints safely: to a temporary directory beside the target, renamed into place."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import AttnswapError


def check_out(out: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing output unless forced. Call before any work, so nothing runs for nothing."""
    out = Path(out)
    if out.exists() and not force:
        raise AttnswapError(f"output '{out}' already exists; pass --force to overwrite it")
    if out.exists() and not out.is_dir():
        raise AttnswapError(f"output '{out}' exists and is not a directory")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False):
    """Yield a temp dir; on success it replaces `out` in one rename, on failure it is removed."""
    out = check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
         files: dict[str, str] | None = None) -> Path:
    """Write a loadable checkpoint directory (safetensors + config.json with the `attnswap` section)."""
    with atomic_dir(out, force) as tmp:
        write_model(model, tmp, tokenizer)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


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


def load_variant_tensors(model: nn.Module, directory: Path) -> None:
    """Load the tensors the variants own (`...attnswap.*`), which the base class does not know about."""
    wanted = {k: v for k, v in model.state_dict().items() if ".attnswap." in k}
    if not wanted:
        return
    found = {}
    try:
        for f in _safetensors_files(directory):
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    if k in wanted:
                        found[k] = st.get_tensor(k)
    except (SafetensorError, OSError) as e:
        raise AttnswapError(f"cannot read checkpoint '{directory}': {e}") from None
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise AttnswapError(f"checkpoint '{directory}' lacks {len(missing)} variant tensors, e.g. '{missing[0]}'")
    model.load_state_dict(found, strict=False)
