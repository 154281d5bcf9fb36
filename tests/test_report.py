"""`attnswap report` (issue 20): its numbers are those of the individual commands with the configs it prints,
the tokens spent are read from what conversion and training recorded, `export --report` carries the page into
the model card, and bad input is one line."""
import json
from pathlib import Path

import pytest
import torch

from attnswap import commands
from attnswap.cli import main
from attnswap.config import (CalibrationConfig, ConvertConfig, EvalConfig, ExportConfig, FinetuneConfig,
                             ReportConfig)
from attnswap.report import PeakMemory, tokens_spent

from .conftest import WIKI_TEST, WIKI_TRAIN
from .test_reliability import one_line


@pytest.fixture(scope="module")
def adapted(tiny_dirs, tmp_path_factory):
    """A tiny Llama converted with calibration (lowrank measures its projections) and fine-tuned 3 steps."""
    d = tmp_path_factory.mktemp("report")
    cfg = ConvertConfig(to="lowrank", options={"energy": 0.9}, calibration=str(WIKI_TRAIN), calibration_tokens=256,
                        calibration_seq_len=64)
    commands.convert(str(tiny_dirs["llama"]), cfg, str(d / "conv"))
    ft = FinetuneConfig(data=str(WIKI_TRAIN), steps=3, seq_len=32, lora_r=2, warmup=0)
    commands.finetune(str(d / "conv"), ft, str(d / "ft"))
    return d / "ft"


def _report(capsys, *args):
    code = main(["report", *map(str, args), "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else None), err


def test_report_numbers_equal_the_commands_and_tokens_come_from_the_records(adapted, tiny_dirs, tmp_path, capsys):
    orig = str(tiny_dirs["llama"])
    code, r, err = _report(capsys, adapted, "--compare", orig, "--data", WIKI_TEST, "--max-tokens", 256, "--seq-len",
                           64, "--long-seq-len", 128, "--lengths", "40,72", "--decode-tokens", 4, "--inspect-tokens",
                           48, "--out", tmp_path / "rep")
    assert code == 0, err
    # perplexity and calibration: the very numbers of the commands run with the configs the page prints
    ev = commands.eval_perplexity(str(adapted), EvalConfig(data=str(WIKI_TEST), max_tokens=256, seq_len=64,
                                                           compare=orig), progress=False)
    assert r["perplexity"]["perplexity"] == ev["perplexity"] and r["perplexity"]["ratio"] == ev["ratio"]
    assert r["perplexity"]["original"]["perplexity"] == ev["original"]["perplexity"]
    long = commands.eval_perplexity(str(adapted), EvalConfig(data=str(WIKI_TEST), max_tokens=256, seq_len=128,
                                                             compare=orig), progress=False)
    assert r["long_context"]["perplexity"] == long["perplexity"] and r["long_context"]["seq_len"] == 128
    for who in (str(adapted), orig):
        cal = commands.eval_calibration(who, CalibrationConfig(data=str(WIKI_TEST), max_tokens=256, seq_len=64))
        assert r["calibration"][who]["ece"] == cal["ece"] and r["calibration"][who]["nll"] == cal["nll"]
    assert r["commands"]["perplexity"] == (f"attnswap eval perplexity {adapted} --data {WIKI_TEST} --max-tokens 256 "
                                           f"--seq-len 64 --compare {orig}")
    # tokens spent: the calibration windows of the conversion (forward only) and the fine-tune's 3 x 32
    steps = {x["step"]: x for x in r["tokens_spent"]["rows"]}
    assert steps["finetune"]["tokens"] == 3 * 32 and steps["finetune"]["trained"]
    assert [x["tokens"] for x in r["tokens_spent"]["rows"] if not x["trained"]] == [256]
    assert r["tokens_spent"]["trained"] == 96 and r["tokens_spent"]["read"] == 256
    # speed: every length for both models; the cache at L holds L tokens of K and V in every layer (fp32)
    for who in (str(adapted), orig):
        rows = r["speed"][who]
        assert [x["length"] for x in rows] == [40, 72] and all(x["decode_tokens"] == 4 for x in rows)
        for x in rows:
            assert x["peak_cache_bytes"] == 2 * 2 * 2 * (x["length"] - 1) * 8 * 4  # layers, k+v, kv heads, d 8
            assert x["prefill_tokens_per_second"] > 0 and x["decode_tokens_per_second"] > 0
    # inspect of both models; the converted one against the original
    ins = r["inspect"]
    assert set(ins) == {str(adapted), orig} and ins[orig]["tokens"] == 48
    assert "output_error" in ins[str(adapted)]["per_head"] and "output_error" not in ins[orig]["per_head"]
    page = (tmp_path / "rep" / "report.md").read_text()
    for fragment in ("## Tokens spent", "| finetune | 96 | yes |", f"{ev['perplexity']:.3f}", f"{ev['ratio']:.4f}",
                     "![cache bytes](cache_bytes.png)", "![sink_ratio](inspect_sink_ratio.png)", "lowrank"):
        assert fragment in page, fragment
    for png in r["plots"]:
        assert (tmp_path / "rep" / png).stat().st_size > 1000
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["perplexity"] == r["perplexity"]

    # export --report: the page becomes a section of the model card, its files travel under report/
    commands.export(str(adapted), ExportConfig(report=str(tmp_path / "rep")), str(tmp_path / "exp"))
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "## Report" in card and "### Tokens spent" in card and card.index("## Report") < card.index("## Load")
    assert "![sink_ratio](report/inspect_sink_ratio.png)" in card
    assert (tmp_path / "exp" / "report" / "inspect_sink_ratio.png").is_file()
    assert not (tmp_path / "exp" / "report" / "attnswap-manifest.json").exists()


def test_tokens_spent_reads_the_plan_and_the_metrics():
    section = {"schema": 2, "plan": {"attention": [{"layers": [0], "method": "sparse", "options": {}}]},
               "prepared": {"attention.0": {"calibration": {"data": "a/../b.txt", "tokens": 512}}}}
    metrics = {"distill": {"tokens": 1000, "config": {"data": "d.txt"}}, "finetune": {"tokens": 64, "data": "f.txt"}}
    t = tokens_spent(section, metrics)
    assert t["trained"] == 1064 and t["read"] == 512
    assert [(x["step"], x["data"]) for x in t["rows"]] == [("convert (attention.0: calibration)", "b.txt"),
                                                            ("distill", "d.txt"), ("finetune", "f.txt")]
    assert tokens_spent(None, {}) == {"rows": [], "trained": 0, "read": 0}


def test_peak_memory_sees_a_block_allocation():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the CPU peak is read from Linux's /proc")
    with PeakMemory(torch.device("cpu")) as p:
        x = torch.ones(32, 1024, 1024)  # 128 MiB, touched
        del x
    assert p.mib is not None and 120 <= p.mib <= 200


def test_report_bad_input_is_one_line(tiny_dirs, tmp_path, capsys):
    llama = tiny_dirs["llama"]
    code, _, err = _report(capsys, llama, "--data", WIKI_TEST, "--lengths", "16,64", "--decode-tokens", 16,
                           "--out", tmp_path / "a")
    one_line(code, err, "--lengths 16", "--decode-tokens")
    code, _, err = _report(capsys, llama, "--data", WIKI_TEST, "--lengths", "1024", "--out", tmp_path / "b")
    one_line(code, err, "--lengths 1024", "512")
    code, _, err = _report(capsys, llama, "--data", WIKI_TEST, "--compare", tiny_dirs["bert"], "--out", tmp_path / "c")
    one_line(code, err, "bert")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    code = main(["export", str(llama), "--report", str(tmp_path), "--out", str(tmp_path / "e")])
    _, err = capsys.readouterr()
    one_line(code, err, "--report", "report.md")


def test_recipe_report_step_lands_in_the_exported_card(tiny_dirs, tmp_path, capsys):
    """A recipe with a report step (compare: the recipe's model by default): RUN/report is written and the
    export's model card carries the page, its perplexity the report's."""
    import yaml

    recipe = {"model": str(tiny_dirs["llama"]), "convert": {"to": "sliding-window", "options": {"window": 16}},
              "report": {"data": str(WIKI_TEST), "max_tokens": 128, "seq_len": 64, "long_seq_len": 0,
                         "lengths": [40], "decode_tokens": 4, "inspect_tokens": 32}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--json"]) == 0, capsys.readouterr().err
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["report"]["out"] == str(tmp_path / "run" / "report")
    rep = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert rep["compare"] == str(tiny_dirs["llama"]) and "long_context" not in rep
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "## Report" in card and f"{rep['perplexity']['perplexity']:.3f}" in card
    assert (tmp_path / "run" / "final" / "report" / "cache_bytes.png").is_file()


def test_report_with_a_cache_policy_and_lm_eval_equals_those_commands(tiny_dirs, tmp_path, capsys):
    """A plan with a cache policy gets the `eval memory` section, and --tasks the lm-eval one: both the numbers of
    those commands run with the printed configs."""
    from attnswap.config import LmEvalConfig, MemoryEvalConfig

    plan = {"attention": [{"layers": [0], "method": "sliding-window", "options": {"window": 16}}],
            "cache": {"policy": "h2o", "budget": 0.5, "interval": 16}}
    commands.convert(str(tiny_dirs["llama"]), ConvertConfig(plan=plan), str(tmp_path / "conv"))
    src = str(tmp_path / "conv")
    code, r, err = _report(capsys, src, "--data", WIKI_TEST, "--max-tokens", 128, "--seq-len", 64, "--long-seq-len",
                           0, "--lengths", 40, "--decode-tokens", 4, "--inspect-tokens", 32, "--memory-context", 128,
                           "--tasks", "attnswap_wikitext_nextsent", "--limit", 4, "--out", tmp_path / "rep")
    assert code == 0, err
    mem = commands.eval_memory(src, MemoryEvalConfig(data=str(WIKI_TEST), tasks=["ppl"], context=128, score_from=64))
    assert r["memory"]["ppl"]["perplexity"] == mem["ppl"]["perplexity"] and r["memory"]["cache"]["policy"] == "h2o"
    assert r["commands"]["memory"] == (f"attnswap eval memory {src} --data {WIKI_TEST} --tasks ppl --context 128 "
                                       "--score-from 64")
    lm = commands.eval_lm_eval(src, LmEvalConfig(tasks="attnswap_wikitext_nextsent", limit=4))
    assert r["lm_eval"]["results"] == lm["results"]
    page = (tmp_path / "rep" / "report.md").read_text()
    assert "## Cache policy (`eval memory`)" in page and f"{mem['ppl']['perplexity']:.3f}" in page
    assert lm["table"] in page
    code, _, err = _report(capsys, src, "--data", WIKI_TEST, "--lengths", 64, "--seq-len", 64, "--inspect-tokens", 32,
                           "--memory-context", 4096, "--out", tmp_path / "bad")
    one_line(code, err, "--memory-context 4096")
