"""Text in, token ids out: local UTF-8 files (the offline path) or `wikitext` through `datasets`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AttnswapError

# name -> (dataset, config, split); text = the rows concatenated, identical to the raw .txt files
HUB_TEXTS = {
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
    "wikitext-valid": ("Salesforce/wikitext", "wikitext-2-raw-v1", "validation"),
    "wikitext-train": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
}


def check_data(spec: str) -> None:
    """Fail early (before any model loads) on a missing, empty or unreadable data file."""
    if spec in HUB_TEXTS:
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        raise AttnswapError(f"data '{spec}' is a directory; pass a UTF-8 text file")
    if not path.is_file():
        raise AttnswapError(f"data file not found: {spec} (pass a UTF-8 text file or one of: {', '.join(HUB_TEXTS)})")
    if path.stat().st_size == 0:
        raise AttnswapError(f"data file is empty: {spec}")


def read_text(spec: str, max_chars: int | None = None) -> str:
    """The whole text (or its first `max_chars` characters) of a local file or a named hub dataset."""
    check_data(spec)
    if spec in HUB_TEXTS:
        name, config, split = HUB_TEXTS[spec]
        try:
            import datasets

            rows = datasets.load_dataset(name, config, split=split)["text"]
        except Exception as e:  # noqa: BLE001
            raise AttnswapError(f"could not load '{spec}' through datasets ({str(e).splitlines()[0][:120]}); "
                                "pass a local text file instead") from None
        text = "".join(rows)
        return text[:max_chars] if max_chars else text
    try:
        with open(Path(spec).expanduser(), encoding="utf-8") as f:
            text = f.read(max_chars) if max_chars else f.read()
    except UnicodeDecodeError:
        raise AttnswapError(f"data file is not UTF-8 text: {spec}") from None
    if not text.strip():
        raise AttnswapError(f"data file has no text: {spec}")
    return text


def encode(tokenizer, text: str) -> torch.Tensor:
    """ids = tokenizer(text, add_special_tokens=False), as a 1-D LongTensor."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def training_ids(tokenizer, spec: str, n_tokens: int) -> torch.Tensor:
    """At least `n_tokens` ids from the start of a text, repeating it if it is shorter (more epochs)."""
    chars = max(4 * n_tokens, 10_000)  # English BPE: about 4-5 characters per token
    while True:
        text = read_text(spec, max_chars=chars)
        ids = encode(tokenizer, text)
        if len(ids) >= n_tokens or len(text) < chars:
            break
        chars *= 2
    if len(ids) < 2:
        raise AttnswapError(f"data file {spec} has fewer than 2 tokens")
    reps = -(-n_tokens // len(ids))
    return ids.repeat(reps)[: max(n_tokens, len(ids))]


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len]; a trailing partial window is dropped."""
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


@dataclass(frozen=True)
class Calibration:
    """Token windows [N, T] on which a variant measures the original model before converting it."""

    ids: torch.Tensor
    source: str = "ids"
    seed: int | None = None

    def describe(self) -> dict:
        n, t = self.ids.shape
        return {"data": self.source, "windows": n, "seq_len": t, "tokens": n * t, "seed": self.seed}


def calibration(tokenizer, spec: str, tokens: int = 4096, seq_len: int = 512, seed: int = 0) -> Calibration:
    """`tokens` of calibration text as windows of `seq_len`, drawn (seeded) from the first 8 x `tokens` of `spec`.

    The same text, sizes and seed always give the same windows.
    """
    if tokens < 2 or seq_len < 2:
        raise AttnswapError(f"calibration needs at least 2 tokens per window, got tokens={tokens}, seq_len={seq_len}")
    seq_len = min(seq_len, tokens)
    pool = windows(training_ids(tokenizer, spec, 8 * tokens), seq_len)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return Calibration(pool[order[: max(1, tokens // seq_len)]].clone(), str(spec), seed)
