"""Passage retrieval by sentence embedding: how well a model's embeddings still find what belongs together.

The protocol (`attnswap eval retrieval`), on any text a user gives:
- passages: the text's non-empty lines, consecutive ones joined with a newline until their tokens (the model's
  tokenizer, no special tokens) reach `length`; the passage is those first `length` tokens (the rest of its last
  line is dropped and the next passage starts at the next line); at most `n` passages, and a text whose end does
  not fill a passage ends there;
- each passage is split at its token midpoint; each first half is the query, the second halves are the
  candidates, and the right answer is the query's own second half;
- an embedding is the mean of the model's last hidden states over the tokens (the tokenizer's special tokens
  added, as all-MiniLM-L6-v2 is used); similarity is cosine;
- accuracy@1 (the own second half ranks first), MRR (the mean of 1 / its rank; a candidate that ties with the
  right answer does not push it down) and, beside an original, the mean overlap of each query's 10 nearest
  candidates with the original's 10 (a fraction: 1.0 = the same neighbours).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .errors import AttnswapError


def cut_passages(tokenizer, text: str, *, n: int, length: int) -> list[list[int]]:
    """At most n passages of exactly `length` token ids (see the module docstring for the rule)."""
    out: list[list[int]] = []
    lines: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        lines.append(line)
        ids = tokenizer("\n".join(lines), add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
            lines = []
            if len(out) == n:
                break
    return out


def special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text's own ids ([CLS] .. [SEP] for BERT, <s> for Llama),
    read off one encoded probe word."""
    plain = tokenizer("attention", add_special_tokens=False)["input_ids"]
    full = tokenizer("attention")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []


@torch.no_grad()
def embed(model, tokenizer, pieces: list[list[int]], batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled last hidden states [N, hidden] of token-id lists (special tokens added), float32."""
    device = next(model.parameters()).device
    before, after = special_wrap(tokenizer)
    rows = [before + p + after for p in pieces]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    model.eval()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1].float()
        m = mask[..., None].float()
        out.append((hidden * m).sum(1) / m.sum(1))
    return torch.cat(out)


def ranks(queries: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank of each query's own candidate (1 = first), cosine similarities [N, N]) for embeddings [N, d]."""
    sim = F.normalize(queries.double(), dim=-1) @ F.normalize(candidates.double(), dim=-1).T
    own = sim.diagonal()[:, None]
    return 1 + (sim > own).sum(1), sim


def scores(queries: torch.Tensor, candidates: torch.Tensor) -> dict:
    r, sim = ranks(queries, candidates)
    return {"accuracy_at_1": float((r == 1).double().mean()), "mrr": float((1.0 / r.double()).mean()),
            "sim": sim}


def top_k_overlap(sim_a: torch.Tensor, sim_b: torch.Tensor, k: int = 10) -> float:
    """Mean fraction of each row's k most similar candidates that two similarity matrices share."""
    k = min(k, sim_a.shape[1])
    a, b = sim_a.topk(k, dim=1).indices, sim_b.topk(k, dim=1).indices
    shared = (a[:, :, None] == b[:, None, :]).any(-1).sum(1)
    return float((shared.double() / k).mean())


def retrieval(model, tokenizer, text: str, *, passages: int, length: int, batch_size: int = 32) -> dict:
    """The protocol on one model: its scores and the similarity matrix (kept for the comparison)."""
    cut = cut_passages(tokenizer, text, n=passages, length=length)
    if len(cut) < 2:
        raise AttnswapError(f"retrieval needs at least 2 passages of {length} tokens; the text gives {len(cut)} "
                            "(pass a longer text or a smaller --length)")
    half = length // 2
    first = embed(model, tokenizer, [p[:half] for p in cut], batch_size)
    second = embed(model, tokenizer, [p[half:] for p in cut], batch_size)
    return {"passages": len(cut), "length": length, **scores(first, second)}
