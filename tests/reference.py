"""An independent implementation of the evaluation protocol and of windowed attention, for the tests.

It shares no code with attnswap: plain transformers models, an explicit eager attention written here,
its own windowing and NLL arithmetic (float64 sums of per-token cross-entropy).
"""
import math

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask


def window_allowed(i: int, j: int, window: int | None, sinks: int, causal: bool) -> bool:
    """The rule of the issue, for one (query, key) pair."""
    if causal and j > i:
        return False
    if window is None:
        return True
    near = (i - j < window) if causal else abs(i - j) < window
    return near or j < sinks


def explicit_window_attention(window: int | None, sinks: int):
    """An attention function: scores, an explicit causal/window mask, softmax, weighted values."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, h, tq, d = query.shape
        groups = h // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        scores = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else d**-0.5)
        tk = key.shape[2]
        qpos = torch.arange(tk - tq, tk)[:, None]
        kpos = torch.arange(tk)[None, :]
        allowed = kpos <= qpos
        if window is not None:
            allowed = allowed & ((qpos - kpos < window) | (kpos < sinks))
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
        return (probs @ value).transpose(1, 2).contiguous(), probs

    return attend


def register_reference(name: str, window: int | None, sinks: int) -> str:
    AttentionInterface.register(name, explicit_window_attention(window, sinks))
    AttentionMaskInterface.register(name, eager_mask)
    return name


@torch.no_grad()
def reference_perplexity(model, tokenizer, text: str, max_tokens: int, seq_len: int) -> float:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    total, count = 0.0, 0
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        window = torch.tensor(ids[start : start + seq_len])[None]
        logits = model(input_ids=window).logits[0].double()
        total += float(F.cross_entropy(logits[:-1], window[0, 1:], reduction="sum"))
        count += seq_len - 1
    return math.exp(total / count)
