"""Sequence classification: labelled examples, a classification head on any model, and its calibration.

Data: a JSON Lines file, one example per line: {"text": "...", "label": "..."} with an optional "text_pair"
(sentence-pair tasks; both go through the tokenizer as a pair, truncated together to --seq-len tokens). Labels
are strings or integers; their sorted distinct values (as strings) become the head's classes (`id2label`).

`finetune --task classification` loads the model (original or converted) with transformers' sequence-
classification head (`AutoModelForSequenceClassification`: BERT's pooled [CLS], a causal LM's last token), a
new head of that many classes initialised from --seed, and trains LoRA (or the plan's tuner) and the whole head
with cross-entropy. The checkpoint is a classifier (`architectures: *ForSequenceClassification`) that loads
again with its plan; `eval calibration` scores it on a labelled file: accuracy, NLL, ECE, Brier, entropy, per
member as for next-token predictions (`attnswap.methods.tuners.calibration`), one prediction per example.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import AttnswapError

HEAD = "ForSequenceClassification"


def is_classifier(config) -> bool:
    """A checkpoint with a sequence-classification head (what `finetune --task classification` writes)."""
    return any(a.endswith(HEAD) for a in (getattr(config, "architectures", None) or []))


def read_examples(spec: str) -> list[dict]:
    """The examples of a JSON Lines file; a one-line error naming the first bad line."""
    from .data import check_data

    check_data(spec)
    examples = []
    try:
        lines = Path(spec).expanduser().read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise AttnswapError(f"data file is not UTF-8 text: {spec}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except json.JSONDecodeError:
            raise AttnswapError(f"{spec} line {i} is not JSON; a classification file has one object per line: "
                                '{"text": ..., "label": ...} (optional "text_pair")') from None
        if not isinstance(ex, dict) or not isinstance(ex.get("text"), str) or "label" not in ex:
            raise AttnswapError(f'{spec} line {i}: each line needs "text" (a string) and "label"')
        if "text_pair" in ex and not isinstance(ex["text_pair"], str):
            raise AttnswapError(f'{spec} line {i}: "text_pair" must be a string')
        if not isinstance(ex["label"], (str, int)) or isinstance(ex["label"], bool):
            raise AttnswapError(f'{spec} line {i}: "label" must be a string or an integer')
        examples.append(ex)
    if not examples:
        raise AttnswapError(f"{spec} has no examples")
    pairs = {"text_pair" in ex for ex in examples}
    if len(pairs) > 1:
        raise AttnswapError(f'{spec}: some examples have "text_pair" and some do not; give it on every line or none')
    return examples


def label_names(examples: list[dict]) -> list[str]:
    names = sorted({str(ex["label"]) for ex in examples})
    if len(names) < 2:
        raise AttnswapError(f"classification needs at least 2 classes; the data has only '{names[0]}'")
    return names


def head_labels(config) -> list[str]:
    """The classes of a classifier checkpoint, in head order."""
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[i]) for i in sorted(id2label, key=int)]


def check_labels(examples: list[dict], names: list[str], spec: str) -> None:
    unknown = sorted({str(ex["label"]) for ex in examples} - set(names))
    if unknown:
        raise AttnswapError(f"{spec} has label '{unknown[0]}' that the model's head does not know (its classes: "
                            f"{', '.join(names)})")


def encode(tokenizer, examples: list[dict], names: list[str], seq_len: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask (and token types) [E, L] truncated to seq_len, and labels [E]."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    texts = [ex["text"] for ex in examples]
    pairs = [ex["text_pair"] for ex in examples] if "text_pair" in examples[0] else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
    index = {n: i for i, n in enumerate(names)}
    batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["labels"] = torch.tensor([index[str(ex["label"])] for ex in examples], dtype=torch.long)
    return batch


def rows(batch: dict[str, torch.Tensor], idx: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """Examples idx of an encoded set, cut to their longest real length (right padding)."""
    out = {k: v[idx] for k, v in batch.items()}
    length = int(out["attention_mask"].sum(-1).max())
    return {k: (v[:, :length] if v.dim() == 2 else v).to(device) for k, v in out.items()}


def prepare_head(model, tokenizer, names: list[str]) -> None:
    """Label names and padding in the config (a causal LM's head reads the last non-pad token)."""
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    if getattr(model.config, "pad_token_id", None) is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model.config.pad_token_id = pad


def head_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters outside the backbone: the classification head (trained in full)."""
    backbone = {id(p) for p in model.base_model.parameters()}
    return [p for p in model.parameters() if id(p) not in backbone]


@torch.no_grad()
def calibration(model, tokenizer, data: str, *, seq_len: int = 512, batch_size: int = 32, progress: bool = True,
                label: str = "model", others: tuple = ()) -> dict:
    """Accuracy, NLL, ECE, Brier, entropy, member disagreement (and per-member scores) over the examples of a
    labelled file: the same measures as next-token calibration, one prediction per example. `others`: further
    classifiers of the same classes scored with `model` as one explicit ensemble."""
    from .methods.tuners.calibration import Scores, member_logits, scored_models

    examples = read_examples(data)
    names = head_labels(model.config)
    check_labels(examples, names, data)
    enc = encode(tokenizer, examples, names, seq_len)
    models, n = scored_models(model, others)
    device = next(model.parameters()).device
    scores = Scores(n)
    start = time.perf_counter()
    for s in tqdm(range(0, len(examples), batch_size), desc=f"calibration {label}", disable=not progress,
                  leave=False):
        batch = rows(enc, torch.arange(s, min(s + batch_size, len(examples))), device)
        y = batch.pop("labels")
        scores.add(torch.log_softmax(member_logits(models, **batch).float(), dim=-1).view(n, len(y), -1), y)
    return {**scores.result(), "examples": scores.ens.n, "classes": names, "seq_len": seq_len,
            "seconds": round(time.perf_counter() - start, 2)}
