"""Calibration of next-token predictions, for single models and ensembles alike (docs/evaluation.md).

Windows as in `attnswap.evaluate` (the first `max_tokens` ids, non-overlapping `seq_len` windows, each from an
empty context). Every next-token prediction counts once, with p = the model's distribution (for a model with
N members, the mean of the members' softmax probabilities; N = 1 otherwise) and y the true token:

- accuracy: argmax p == y;  nll: -log p_y;  brier: sum_v (p_v - [v = y])^2;  entropy: -sum_v p_v log p_v
- ece: 10 equal-width confidence bins (confidence = max p): sum_b n_b / n * |accuracy_b - confidence_b|
- disagreement: the fraction of members whose own top-1 differs from the ensemble's top-1 (0 for one model)
- members: accuracy, nll and ece of each member alone
- ece_floor: the ECE a perfectly calibrated model would show with the same bin counts and confidences
  (sampled): the finite-sample noise floor of `ece`
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ...errors import AttnswapError
from ...evaluate import protocol_windows
from .members import member_count, per_member

BINS = 10
CHUNK = 256  # positions per softmax block: bounds memory at N x CHUNK x vocab floats


@dataclass
class _Tally:
    """Sums for accuracy, nll, ece over a stream of predictions."""

    bins: int = BINS
    n: int = 0
    correct: float = 0.0
    nll: float = 0.0
    brier: float = 0.0
    entropy: float = 0.0
    bin_n: torch.Tensor = field(init=False)
    bin_conf: torch.Tensor = field(init=False)
    bin_acc: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.bin_n = torch.zeros(self.bins, dtype=torch.float64)
        self.bin_conf = torch.zeros(self.bins, dtype=torch.float64)
        self.bin_acc = torch.zeros(self.bins, dtype=torch.float64)

    def add(self, logp: torch.Tensor, y: torch.Tensor, full: bool = False) -> torch.Tensor:
        """logp [P, V] log-probabilities, y [P]; returns the top-1 predictions."""
        conf, pred = logp.max(-1)
        conf = conf.exp()
        hit = (pred == y).double()
        logp_y = logp.gather(-1, y[:, None]).squeeze(-1)
        self.n += y.numel()
        self.correct += float(hit.sum())
        self.nll += float(-logp_y.double().sum())
        b = (conf.double() * self.bins).long().clamp_(0, self.bins - 1)
        self.bin_n += torch.bincount(b, minlength=self.bins).double()
        self.bin_conf += torch.bincount(b, weights=conf.double(), minlength=self.bins)
        self.bin_acc += torch.bincount(b, weights=hit, minlength=self.bins)
        if full:
            p = logp.exp()
            self.brier += float(((p * p).sum(-1) - 2 * logp_y.exp() + 1).double().sum())
            self.entropy += float(-(p * logp).nan_to_num().sum(-1).double().sum())
        return pred

    def ece(self) -> float:
        nz = self.bin_n > 0
        gap = (self.bin_acc[nz] / self.bin_n[nz] - self.bin_conf[nz] / self.bin_n[nz]).abs()
        return float((gap * self.bin_n[nz]).sum() / self.n)

    def summary(self) -> dict:
        return {"accuracy": self.correct / self.n, "nll": self.nll / self.n, "ece": self.ece()}

    def reliability(self) -> list[dict]:
        rows = []
        for i in range(self.bins):
            n = float(self.bin_n[i])
            rows.append({"lo": i / self.bins, "hi": (i + 1) / self.bins, "count": int(n),
                         "confidence": float(self.bin_conf[i] / n) if n else None,
                         "accuracy": float(self.bin_acc[i] / n) if n else None})
        return rows


def ece_floor(reliability: list[dict], samples: int = 2000, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model would show with these bins' counts and confidences, from sampling.

    Each bin's hits are drawn as Binomial(count, mean confidence); the mean ECE over `samples` draws is the
    finite-sample noise floor: measured ECEs near it cannot be told apart from perfect calibration.
    """
    rows = [b for b in reliability if b["count"]]
    n = torch.tensor([float(b["count"]) for b in rows], dtype=torch.float64)
    conf = torch.tensor([b["confidence"] for b in rows], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    hits = torch.binomial(n.expand(samples, -1).contiguous(), conf.expand(samples, -1).contiguous(), generator=g)
    return float(((hits / n - conf).abs() * n).sum(-1).mean() / n.sum())


class Scores:
    """The tallies of an ensemble's predictions and of each member's, fed block by block."""

    def __init__(self, members: int):
        self.n = members
        self.ens, self.members = _Tally(), [_Tally() for _ in range(members)]
        self.disagree = 0.0

    def add(self, lp: torch.Tensor, y: torch.Tensor) -> None:
        """lp [N, P, C] the members' log-probabilities of P predictions, y [P] the true classes."""
        mean = torch.logsumexp(lp, dim=0) - torch.log(torch.tensor(float(self.n)))
        top = self.ens.add(mean, y, full=True)
        for m in range(self.n):
            own = self.members[m].add(lp[m], y)
            self.disagree += float((own != top).double().sum()) / self.n

    def result(self) -> dict:
        ens = self.ens
        return {
            **ens.summary(),
            "brier": ens.brier / ens.n,
            "entropy": ens.entropy / ens.n,
            "disagreement": self.disagree / ens.n,
            "members": self.n,
            "member_scores": [m.summary() for m in self.members] if self.n > 1 else [],
            "ece_floor": ece_floor(ens.reliability()),
            "reliability": ens.reliability(),
            "bins": BINS,
        }


def scored_models(model, others=()) -> tuple[list, int]:
    """The models scored together (in eval mode) and their members in all: one ensemble."""
    models = [model, *others]
    for m in models:
        m.eval()
    return models, sum(member_count(m) for m in models)


def member_logits(models: list, **inputs) -> torch.Tensor:
    """Every member's logits of every model, stacked member-major: [sum of members x B, ...]."""
    out = []
    for model in models:
        with per_member(model):
            out.append(model(**inputs).logits)
    return torch.cat(out) if len(out) > 1 else out[0]


@torch.no_grad()
def calibration(model, tokenizer, data: str, *, max_tokens: int | None = None, seq_len: int = 1024,
                progress: bool = True, label: str = "model", others: tuple = ()) -> dict:
    """Accuracy, NLL, ECE, Brier, entropy, member disagreement (and per-member scores) on `data`. `others`:
    further models scored with `model` as one explicit ensemble (the mean of all their members' probabilities)."""
    rows = protocol_windows(model, tokenizer, data, max_tokens, seq_len, label)
    models, n = scored_models(model, others)
    device = next(model.parameters()).device
    scores = Scores(n)
    start = time.perf_counter()
    bar = tqdm(total=len(rows), desc=f"calibration {label}", unit="win", disable=not progress, leave=False)
    for row in rows:
        batch = row[None].to(device)
        logits = member_logits(models, input_ids=batch)  # [N, T, V]
        y = batch[0, 1:]
        for s in range(0, seq_len - 1, CHUNK):
            lp = torch.log_softmax(logits[:, s : min(s + CHUNK, seq_len - 1)].float(), dim=-1)  # [N, P, V]
            scores.add(lp, y[s : s + lp.shape[1]])
        bar.update(1)
    bar.close()
    return {**scores.result(), "tokens": scores.ens.n, "windows": len(rows), "seq_len": seq_len,
            "seconds": round(time.perf_counter() - start, 2)}


def reliability_plot(results: dict[str, dict], path) -> None:
    """Reliability diagram (accuracy per confidence bin, with the diagonal) of one or more results, as PNG."""
    try:
        import matplotlib
    except ImportError:
        raise AttnswapError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    for name, r in results.items():
        pts = [(b["confidence"], b["accuracy"]) for b in r["reliability"] if b["count"]]
        ax.plot(*zip(*pts), marker="o", label=f"{name} (ECE {r['ece']:.4f})")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
