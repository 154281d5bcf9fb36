"""`attnswap inspect` (issue 20) on tiny models: one JSON and PNG heatmaps; a method with its own matrix
(sliding-window) measured from it, one without (linear) reported as not defined; --compare against the same
model gives zero output error; bad input is one line."""
import json
import math

import attnswap
from attnswap.cli import main

from .conftest import WIKI_TEST
from .test_reliability import one_line


def _inspect(capsys, *args):
    code = main(["inspect", *map(str, args), "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else None), err


def test_inspect_writes_every_metric_and_its_heatmaps(tiny_dirs, tmp_path, capsys):
    code, r, err = _inspect(capsys, tiny_dirs["llama"], "--data", WIKI_TEST, "--tokens", 96, "--sinks", 2,
                            "--band", 8, "--compare", tiny_dirs["llama"], "--out", tmp_path / "i")
    assert code == 0, err
    saved = json.loads((tmp_path / "i" / "inspect.json").read_text())
    assert saved["per_head"] == r["per_head"] and r["tokens"] == 96 and r["layers"] == [0, 1]
    heads = 4
    for name in ("entropy", "entropy_relative", "sink_mass", "sink_ratio", "band_mass", "keys_for_mass",
                 "spectral_gap", "redundancy", "output_error"):
        rows = r["per_head"][name]
        assert len(rows) == 2 and all(len(row) == heads and all(math.isfinite(v) for v in row) for row in rows)
    ph = r["per_head"]
    assert all(0 < v <= 1 + 1e-9 for row in ph["entropy_relative"] for v in row)
    assert all(0 <= v <= 1 + 1e-9 for row in ph["spectral_gap"] + ph["band_mass"] + ph["sink_mass"] for v in row)
    assert all(1 <= v <= 96 for row in ph["keys_for_mass"] for v in row)
    assert ph["sink_ratio"] == [[round(m / (2 / 96), 6) for m in row] for row in ph["sink_mass"]] or all(
        abs(a - m / (2 / 96)) <= 1e-4 for ra, rm in zip(ph["sink_ratio"], ph["sink_mass"]) for a, m in zip(ra, rm))
    assert all(v == 0 for row in ph["output_error"] for v in row)  # the same model on the same tokens
    assert r["not_defined"] == {}
    # KPCA alignment per layer and KV head (2 of them), on min(128, 96) tokens
    assert r["kpca_tokens"] == 96
    for name in ("kpca_optimal_cosine", "kpca_linear_cka", "kpca_kernel_cka"):
        rows = r["per_kv_head"][name]
        assert len(rows) == 2 and all(len(row) == 2 and all(-1 <= v <= 1 + 1e-9 for v in row) for row in rows), name
    assert all(0 <= v for row in r["per_kv_head"]["kpca_linear_cka"] for v in row)
    for png in ("entropy.png", "sink_ratio.png", "spectral_gap.png", "output_error.png", "collapse.png",
                "kpca_linear_cka.png"):
        assert (tmp_path / "i" / png).stat().st_size > 1000
    for c in r["per_layer"]["collapse_with_residual"] + r["per_layer"]["collapse_attention_only"]:
        assert 0 < c["frobenius"] <= 1 + 1e-9


def test_methods_with_and_without_an_attention_matrix(tiny_dirs, tiny_tokenizer, tmp_path, capsys):
    _, plain, _ = _inspect(capsys, tiny_dirs["llama"], "--data", WIKI_TEST, "--tokens", 64, "--out", tmp_path / "p")
    # a window longer than the text: the method's own matrix is the original softmax
    wide = attnswap.convert(attnswap.load_model(tiny_dirs["llama"]), "sliding-window", window=100, sinks=0)
    wide.save_pretrained(tmp_path / "wide")
    tiny_tokenizer.save_pretrained(tmp_path / "wide")
    code, r, err = _inspect(capsys, tmp_path / "wide", "--data", WIKI_TEST, "--tokens", 64, "--out", tmp_path / "w")
    assert code == 0, err
    for name in ("entropy", "sink_mass", "band_mass", "keys_for_mass", "spectral_gap"):
        for a, b in zip(sum(r["per_head"][name], []), sum(plain["per_head"][name], [])):
            assert abs(a - b) <= 1e-4, name
    narrow = attnswap.convert(attnswap.load_model(tiny_dirs["llama"]), "sliding-window", window=4, sinks=0)
    narrow.save_pretrained(tmp_path / "narrow")
    tiny_tokenizer.save_pretrained(tmp_path / "narrow")
    _, n, _ = _inspect(capsys, tmp_path / "narrow", "--data", WIKI_TEST, "--tokens", 64, "--band", 4,
                       "--out", tmp_path / "n")
    assert all(abs(v - 1) <= 1e-9 for row in n["per_head"]["band_mass"] for v in row)  # all mass in the band
    assert all(v <= 4 for row in n["per_head"]["keys_for_mass"] for v in row)
    lin = attnswap.convert(attnswap.load_model(tiny_dirs["llama"]), "linear", layers="1", window=8)
    lin.save_pretrained(tmp_path / "lin")
    tiny_tokenizer.save_pretrained(tmp_path / "lin")
    code, r, err = _inspect(capsys, tmp_path / "lin", "--data", WIKI_TEST, "--tokens", 64, "--compare",
                            tiny_dirs["llama"], "--out", tmp_path / "l")
    assert code == 0, err
    assert r["not_defined"] == {"1": ["entropy", "entropy_relative", "sink_mass", "sink_ratio", "band_mass",
                                      "keys_for_mass", "spectral_gap"]}
    assert r["per_head"]["entropy"][1] == [None] * 4 and None not in r["per_head"]["entropy"][0]
    assert r["per_head"]["output_error"][0] == [0.0] * 4 and min(r["per_head"]["output_error"][1]) > 0


def test_bad_input_is_one_line_and_writes_nothing(tiny_dirs, tmp_path, capsys):
    code, _, err = _inspect(capsys, tiny_dirs["llama"], "--data", WIKI_TEST, "--tokens", 4096, "--out", tmp_path / "a")
    one_line(code, err, "--tokens")
    code, _, err = _inspect(capsys, tiny_dirs["llama"], "--data", WIKI_TEST, "--layers", "5", "--tokens", 32,
                            "--out", tmp_path / "b")
    one_line(code, err, "--layers")
    code, _, err = _inspect(capsys, tiny_dirs["llama"], "--data", tmp_path / "missing.txt", "--out", tmp_path / "c")
    one_line(code, err, "missing.txt")
    assert not any((tmp_path / x).exists() for x in "abc")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("a user's file")
    code, _, err = _inspect(capsys, tiny_dirs["llama"], "--data", WIKI_TEST, "--tokens", 32, "--out", tmp_path / "d")
    one_line(code, err, "--force")
    assert (tmp_path / "d" / "mine.txt").read_text() == "a user's file"
