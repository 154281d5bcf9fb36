"""Perplexity under one fixed, documented protocol (docs/evaluation.md).

text = the data read as UTF-8; ids = tokenizer(text, add_special_tokens=False); the first `max_tokens`
ids; non-overlapping windows of `seq_len` tokens (a trailing partial window is dropped), each scored on
its own from an empty context; NLL averaged over the seq_len - 1 predictions of every window;
perplexity = exp(mean NLL).
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from .arch import is_causal_lm
from .data import encode, read_text, windows
from .errors import AttnswapError, NumericalError
from .surgery import base_model as _base


def require_causal_lm(config, label: str = "this model") -> None:
    """One-line error unless `config` describes a causal language model."""
    if not is_causal_lm(config):
        raise AttnswapError(f"perplexity needs a causal language model; {label} is a {config.model_type} encoder")


def require_finite(what: str, **numbers: float) -> None:
    """An evaluation that yields NaN/inf is a failure (exit 3), not a result."""
    bad = ", ".join(f"{k} {v}" for k, v in numbers.items() if not math.isfinite(v))
    if bad:
        raise NumericalError(f"{what} is not finite ({bad}): the model gives non-finite logits; check its weights "
                             "(a diverged fine-tune, an fp16 overflow)")


@torch.no_grad()
def window_nll(model, batch: torch.Tensor) -> torch.Tensor:
    """Summed NLL of the next-token predictions of each row: [B, T] ids -> [B]."""
    logits = model(input_ids=batch).logits.float()  # [B, T, V]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    return -logp.gather(-1, batch[:, 1:, None]).squeeze(-1).sum(-1)


def protocol_windows(model, tokenizer, data: str, max_tokens: int | None, seq_len: int, label: str) -> torch.Tensor:
    """Steps 1-4 of the protocol: the [n, seq_len] windows of `data` a causal `model` is scored on."""
    require_causal_lm(_base(model).config, label)
    if seq_len < 2:
        raise AttnswapError("--seq-len must be at least 2")
    ids = encode(tokenizer, read_text(data))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    rows = windows(ids, seq_len)
    if len(rows) == 0:
        raise AttnswapError(f"{data} has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}")
    return rows


def perplexity(model, tokenizer, data: str, *, max_tokens: int | None = None, seq_len: int = 1024,
               batch_size: int = 1, progress: bool = True, label: str = "model") -> dict:
    """Evaluate `model` on `data` (a text file path or a named dataset) under the protocol above."""
    rows = protocol_windows(model, tokenizer, data, max_tokens, seq_len, label)
    device = next(model.parameters()).device
    model.eval()
    total, start = 0.0, time.perf_counter()
    bar = tqdm(total=len(rows), desc=f"perplexity {label}", unit="win", disable=not progress, leave=False)
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size].to(device)
        total += float(window_nll(model, batch).double().sum())
        bar.update(len(batch))
    bar.close()
    predictions = len(rows) * (seq_len - 1)
    nll = total / predictions
    require_finite(f"the perplexity of {label}", nll=nll)
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "tokens": predictions,
        "windows": len(rows),
        "seq_len": seq_len,
        "seconds": round(time.perf_counter() - start, 2),
    }
