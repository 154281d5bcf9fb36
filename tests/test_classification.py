"""Sequence classification: `finetune --task classification`, `eval calibration` of a classifier (and of an explicit
ensemble with --ensemble), a LoRA-Ensemble classifier, checkpoints that load again, one-line errors."""
import json
import math

import pytest
import torch

import attnswap
from attnswap import classification
from attnswap.config import FinetuneConfig
from attnswap.methods.tuners.members import per_member
from attnswap.train import finetune

from .conftest import WIKI_TEST
from .test_cli_errors import run_cli
from .test_reliability import one_line


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Sentence pairs from WikiText: label 'digit' if the pair has a digit, else 'none' (learnable, both present)."""
    lines = [s.strip() for s in WIKI_TEST.read_text(encoding="utf-8").splitlines() if 8 < len(s.split()) < 40][:60]
    d = tmp_path_factory.mktemp("task")
    rows = [{"text": a, "text_pair": b, "label": "digit" if any(c.isdigit() for c in a + b) else "none"}
            for a, b in zip(lines[0::2], lines[1::2])]
    assert {r["label"] for r in rows} == {"digit", "none"}
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    return d


def _by_hand(models, tokenizer, path, names):
    """Accuracy, nll, ece (10 bins) of the mean of the models' members' probabilities, written out directly."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    members = []  # [n, classes] per member of every model
    for m in models:
        per_row = []
        for r in rows:
            enc = tokenizer(r["text"], r["text_pair"], return_tensors="pt", truncation=True, max_length=128)
            with torch.no_grad(), per_member(m):
                per_row.append(torch.softmax(m(**enc).logits.double(), -1))  # [members, classes]
        members += list(torch.stack(per_row, 1))
    n = len(rows)
    p = torch.stack(members).mean(0)
    y = torch.tensor([names.index(r["label"]) for r in rows])
    conf, pred = p.max(-1)
    hit = (pred == y).double()
    ece = 0.0
    for b in range(10):
        inb = ((conf * 10).long().clamp(0, 9) == b)
        if inb.any():
            ece += float(inb.sum()) / n * abs(float(hit[inb].mean() - conf[inb].mean()))
    return float(hit.mean()), float(-p[torch.arange(n), y].log().mean()), ece


def test_finetune_classification_and_calibration_through_the_cli(capsys, tiny_dirs, task, tmp_path):
    out = tmp_path / "cls"
    code, _, err = run_cli(capsys, "finetune", tiny_dirs["bert"], "--task", "classification", "--data",
                           task / "train.jsonl", "--steps", 30, "--batch-size", 8, "--seq-len", 128, "--lr", "1e-2",
                           "--warmup", 0, "--out", out)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "digit", "1": "none"}
    losses = json.loads((out / "losses.json").read_text())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses  # the head and LoRA learn the training set
    metrics = json.loads((out / "metrics.json").read_text())["finetune"]
    assert metrics["examples"] == 16 and metrics["epochs"] == 15.0
    model = attnswap.load_model(out, merge_lora=True)
    tok = attnswap.load_tokenizer(out)
    acc, nll, ece = _by_hand([model], tok, task / "test.jsonl", ["digit", "none"])
    code, text, err = run_cli(capsys, "eval", "calibration", out, "--data", task / "test.jsonl", "--seq-len", 128,
                              "--json")
    assert code == 0, err
    r = json.loads(text)
    assert r["examples"] == 14 and r["classes"] == ["digit", "none"] and r["members"] == 1
    assert abs(r["accuracy"] - acc) <= 1e-9 and abs(r["nll"] - nll) <= 1e-5 and abs(r["ece"] - ece) <= 1e-5
    # perplexity and next-token fine-tuning are for causal LMs: one line each
    code, _, err = run_cli(capsys, "eval", "perplexity", out, "--data", WIKI_TEST)
    one_line(code, err, "causal language model")
    code, _, err = run_cli(capsys, "finetune", tiny_dirs["bert"], "--data", WIKI_TEST, "--steps", 1, "--out",
                           tmp_path / "x")
    one_line(code, err, "--task classification")


def test_lora_ensemble_classifier_and_explicit_ensemble(capsys, tiny_dirs, task, tmp_path):
    """A converted (3-member) checkpoint trains as a classifier, reloads with every member, and its calibration is
    that of the members' mean; --ensemble of two models is the mean of their probabilities."""
    conv = tmp_path / "conv"
    code, _, err = run_cli(capsys, "convert", tiny_dirs["bert"], "--to", "lora-ensemble", "--set", "members=3",
                           "--out", conv)
    assert code == 0, err
    cfg = FinetuneConfig(data=str(task / "train.jsonl"), steps=6, batch_size=4, seq_len=128, lr=1e-2, warmup=0,
                         task="classification")
    torch.manual_seed(0)
    model = attnswap.load_model(conv, labels=["digit", "none"])
    classification.prepare_head(model, attnswap.load_tokenizer(conv), ["digit", "none"])
    head = [p.detach().clone() for p in classification.head_parameters(model)]
    finetune(model, attnswap.load_tokenizer(conv), cfg, tmp_path / "ens", progress=False)
    assert all((a - b).abs().max() > 0 for a, b in zip(head, classification.head_parameters(model)))
    reloaded = attnswap.load_model(tmp_path / "ens")
    tok = attnswap.load_tokenizer(tmp_path / "ens")
    enc = tok(["a b c", "d e"], ["f", "g h"], return_tensors="pt", padding=True)
    with torch.no_grad(), per_member(model), per_member(reloaded):
        a, b = model.eval()(**enc).logits, reloaded(**enc).logits
    assert a.shape == (6, 2) and (a - b).abs().max() <= 1e-5
    assert (a[0:2] - a[2:4]).abs().max() > 1e-4  # the members differ after training
    acc, nll, ece = _by_hand([reloaded], tok, task / "test.jsonl", ["digit", "none"])
    r = classification.calibration(reloaded, tok, str(task / "test.jsonl"), seq_len=128, progress=False)
    assert r["members"] == 3 and len(r["member_scores"]) == 3
    assert abs(r["accuracy"] - acc) <= 1e-9 and abs(r["nll"] - nll) <= 1e-5 and abs(r["ece"] - ece) <= 1e-5

    # export --member 1: a plain classifier that transformers loads alone, equal to member 1
    code, _, err = run_cli(capsys, "export", tmp_path / "ens", "--member", 1, "--out", tmp_path / "member1")
    assert code == 0, err
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "member1").eval()
    with torch.no_grad():
        assert (plain(**enc).logits - b[2:4]).abs().max() <= 1e-4
    card = (tmp_path / "member1" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification" in card

    # an explicit ensemble: this 3-member model and a single classifier, through the CLI
    single = tmp_path / "single"
    code, _, err = run_cli(capsys, "finetune", tiny_dirs["bert"], "--task", "classification", "--data",
                           task / "train.jsonl", "--steps", 4, "--batch-size", 4, "--seq-len", 128, "--out", single)
    assert code == 0, err
    code, text, err = run_cli(capsys, "eval", "calibration", tmp_path / "ens", "--data", task / "test.jsonl",
                              "--seq-len", 128, "--ensemble", single, "--json")
    assert code == 0, err
    r = json.loads(text)
    acc, nll, ece = _by_hand([reloaded, attnswap.load_model(single, merge_lora=True)], tok, task / "test.jsonl",
                             ["digit", "none"])
    assert r["members"] == 4 and r["ensemble"] == [str(tmp_path / "ens"), str(single)]
    assert abs(r["nll"] - nll) <= 1e-5 and abs(r["ece"] - ece) <= 1e-5 and abs(r["accuracy"] - acc) <= 1e-9


def test_a_causal_lm_trains_as_a_classifier(tiny_dirs, task, tmp_path):
    """Llama's head reads the last real token; right padding must not change a prediction."""
    cfg = FinetuneConfig(data=str(task / "train.jsonl"), steps=3, batch_size=4, seq_len=128, task="classification")
    tok = attnswap.load_tokenizer(tiny_dirs["llama"])
    model = attnswap.load_model(tiny_dirs["llama"], labels=["digit", "none"])
    classification.prepare_head(model, tok, ["digit", "none"])
    finetune(model, tok, cfg, tmp_path / "llama-cls", progress=False)
    reloaded = attnswap.load_model(tmp_path / "llama-cls", merge_lora=True)
    rows = [json.loads(line) for line in (task / "test.jsonl").read_text().splitlines()][:4]
    enc = classification.encode(tok, rows, ["digit", "none"], 128)
    enc.pop("labels")
    with torch.no_grad():
        together = reloaded(**enc).logits
        alone = torch.cat([reloaded(**tok(r["text"], r["text_pair"], return_tensors="pt")).logits for r in rows])
    assert (together - alone).abs().max() <= 1e-4
    r = classification.calibration(reloaded, tok, str(task / "test.jsonl"), seq_len=128, progress=False)
    assert r["examples"] == 14 and math.isfinite(r["nll"])


def test_classification_input_errors(capsys, tiny_dirs, task, tmp_path):
    code, _, err = run_cli(capsys, "finetune", tiny_dirs["bert"], "--task", "classification", "--data", WIKI_TEST,
                           "--steps", 1, "--out", tmp_path / "a")
    one_line(code, err, "line 2 is not JSON")
    one_label = tmp_path / "one.jsonl"
    one_label.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n')
    code, _, err = run_cli(capsys, "finetune", tiny_dirs["bert"], "--task", "classification", "--data", one_label,
                           "--steps", 1, "--out", tmp_path / "b")
    one_line(code, err, "at least 2 classes")
    code, _, err = run_cli(capsys, "finetune", tiny_dirs["bert"], "--task", "classification", "--loss", "kl",
                           "--data", task / "train.jsonl", "--steps", 1, "--out", tmp_path / "c")
    one_line(code, err, "--loss ce")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    cls = tmp_path / "cls"
    code, _, err = run_cli(capsys, "finetune", tiny_dirs["bert"], "--task", "classification", "--data",
                           task / "train.jsonl", "--steps", 1, "--seq-len", 128, "--out", cls)
    assert code == 0, err
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    code, _, err = run_cli(capsys, "eval", "calibration", cls, "--data", other)
    one_line(code, err, "label 'x'", "digit, none")
    code, _, err = run_cli(capsys, "eval", "calibration", cls, "--data", WIKI_TEST)
    one_line(code, err, "not JSON")
    code, _, err = run_cli(capsys, "eval", "calibration", cls, "--data", task / "test.jsonl", "--ensemble",
                           tiny_dirs["bert"])
    one_line(code, err, "--ensemble", "one task")


def test_recipes_refuse_classification_and_encoder_finetunes(capsys, tiny_dirs, task, tmp_path):
    import yaml

    for model, finetune_step, fragment in [
        (tiny_dirs["llama"], {"task": "classification", "data": str(task / "train.jsonl")}, "--task classification"),
        (tiny_dirs["bert"], {"data": str(WIKI_TEST)}, "need a causal LM"),
    ]:
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({"model": str(model), "convert": {"to": "lora-ensemble"},
                                        "finetune": {"steps": 1, "seq_len": 32, **finetune_step}}))
        code, _, err = run_cli(capsys, "run", path, "--out", tmp_path / "run")
        one_line(code, err, fragment)
        assert not (tmp_path / "run").exists()
