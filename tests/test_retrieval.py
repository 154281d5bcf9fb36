"""`attnswap eval retrieval`: the cutting rule, the metrics on a hand-built example, and an identity conversion
scoring exactly as the original."""
import json
import math

import pytest
import torch

import attnswap
from attnswap.cli import main
from attnswap.retrieval import cut_passages, scores, top_k_overlap

from .conftest import WIKI_TEST
from .test_reliability import one_line


def test_three_hand_built_passages():
    """Answers (1, 0), (0, 1), (-1, 0). Query 0 = (1, 0.1) finds its own first; query 1 = (1, 0.5) sees answer 0
    first (cosine 0.894 > 0.447); query 2 = (1, 1) sees answers 0 and 1 (0.707 each) before its own (-0.707).
    Ranks 1, 2, 3: accuracy 1/3, MRR (1 + 1/2 + 1/3) / 3 = 11/18."""
    answers = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    queries = torch.tensor([[1.0, 0.1], [1.0, 0.5], [1.0, 1.0]])
    s = scores(queries, answers)
    assert s["accuracy_at_1"] == pytest.approx(1 / 3, abs=1e-12)
    assert s["mrr"] == pytest.approx(11 / 18, abs=1e-12)
    # a candidate that ties with the right answer does not push it down: query (0, 1) vs answers 0 and 2 (both 0)
    tie = scores(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    assert tie["accuracy_at_1"] == 1.0 and tie["mrr"] == 1.0
    assert top_k_overlap(s["sim"], s["sim"]) == 1.0
    a = torch.eye(3) + 0.1 * torch.tensor([[0.0, 2, 1], [1, 0, 2], [2, 1, 0]])  # each row: own, then a fixed order
    b = a.roll(1, dims=1)  # every row's nearest moves to the next column
    assert top_k_overlap(a, b, k=1) == 0.0 and top_k_overlap(a, b, k=3) == 1.0
    assert top_k_overlap(a, b, k=2) == pytest.approx(0.5)


def test_the_cutting_rule(tiny_tokenizer):
    lines = ["alpha beta gamma delta", "", "epsilon zeta eta theta", "alpha beta gamma delta", "epsilon zeta eta theta",
             "alpha beta"]
    text = "\n".join(lines)

    def n_tok(s):
        return len(tiny_tokenizer(s, add_special_tokens=False)["input_ids"])

    length = n_tok(lines[0] + "\n" + lines[2]) - 1  # the first two non-empty lines overfill one passage by a token
    cut = cut_passages(tiny_tokenizer, text, n=10, length=length)
    assert all(len(p) == length for p in cut)
    assert cut[0] == tiny_tokenizer(lines[0] + "\n" + lines[2], add_special_tokens=False)["input_ids"][:length]
    # the next passage starts at the next line, not inside the cut one
    assert cut[1] == tiny_tokenizer(lines[3] + "\n" + lines[4], add_special_tokens=False)["input_ids"][:length]
    assert len(cut) == 2 and len(cut_passages(tiny_tokenizer, text, n=1, length=length)) == 1


def test_an_identity_conversion_scores_exactly_as_the_original(tiny_dirs, tiny_tokenizer, tmp_path, capsys):
    model = attnswap.load_model(tiny_dirs["bert"])
    attnswap.convert(model, "none")
    model.save_pretrained(tmp_path / "same")
    tiny_tokenizer.save_pretrained(tmp_path / "same")
    capsys.readouterr()
    code = main(["eval", "retrieval", str(tmp_path / "same"), "--data", str(WIKI_TEST), "--passages", "40",
                 "--length", "32", "--compare", str(tiny_dirs["bert"]), "--json"])
    assert code == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["passages"] == 40 and r["length"] == 32
    assert r["accuracy_at_1"] == r["original"]["accuracy_at_1"] and r["mrr"] == r["original"]["mrr"]
    assert r["top10_overlap"] == 1.0
    assert 1 / 40 <= r["mrr"] <= 1 and math.isfinite(r["mrr"])


def test_a_causal_model_and_a_changed_attention(tiny_dirs, tiny_tokenizer, tmp_path, capsys):
    """Any model embeds (mean of its last hidden states); a sliding window changes the neighbours."""
    from attnswap.commands import eval_retrieval
    from attnswap.config import RetrievalConfig

    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "sliding-window", window=2, sinks=0)
    model.save_pretrained(tmp_path / "sw")
    tiny_tokenizer.save_pretrained(tmp_path / "sw")
    r = eval_retrieval(str(tmp_path / "sw"), RetrievalConfig(data=str(WIKI_TEST), passages=30, length=48,
                                                             compare=str(tiny_dirs["llama"])))
    assert r["top10_overlap"] < 1.0
    assert 0 <= r["accuracy_at_1"] <= 1 and 0 < r["original"]["mrr"] <= 1


def test_too_little_text_is_one_line(tiny_dirs, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("one short line\n")
    code = main(["eval", "retrieval", str(tiny_dirs["bert"]), "--data", str(short), "--length", "32"])
    one_line(code, capsys.readouterr().err, "at least 2 passages of 32 tokens", exit_code=code)
    assert code != 0
