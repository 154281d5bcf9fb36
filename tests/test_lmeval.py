"""`attnswap eval lm-eval`: lm-eval's simple_evaluate on the model object attnswap loaded.

On the original SmolLM2, attnswap's path and lm-eval's own `--model hf` (a separate process, the same task,
the same items) give the same accuracy exactly.
"""
import json
import subprocess
import sys

import pytest

import attnswap
from attnswap.cli import main
from attnswap.lmeval import TASKS

TASK = "attnswap_wikitext_nextsent"


def _acc(results: dict) -> tuple[float, float]:
    r = results["results"][TASK]
    return r["acc,none"], r["acc_norm,none"]


@pytest.mark.slow
def test_attnswap_path_equals_lm_eval_hf_on_the_same_items(smollm2_dir, tmp_path, capsys):
    limit = 20
    assert main(["eval", "lm-eval", "smollm2-135m", "--tasks", TASK, "--limit", str(limit), "--batch-size", "8",
                 "--json"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ours["n-samples"][TASK]["effective"] == limit
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={smollm2_dir},dtype=float32", "--tasks", TASK, "--include_path", str(TASKS), "--limit",
           str(limit), "--batch_size", "8", "--device", "cpu", "--output_path", str(tmp_path / "lm-eval")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    (found,) = list((tmp_path / "lm-eval").rglob("results*.json"))
    theirs = json.loads(found.read_text())
    assert _acc(ours) == _acc(theirs)
    # above chance (0.25) by the length-normalised score: the model reads the text (raw log-likelihood sums
    # favour the shorter candidates, so `acc` alone sits near chance on this task)
    _, acc_norm = _acc(ours)
    assert 0.4 <= acc_norm <= 1.0


def test_converted_model_beside_the_original(tiny_dirs, tmp_path, capsys):
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "sliding-window", window=4, sinks=1)
    attnswap.save(model, tmp_path / "sw", tokenizer=attnswap.load_tokenizer(tiny_dirs["llama"]))
    assert main(["eval", "lm-eval", str(tmp_path / "sw"), "--tasks", TASK, "--limit", "12", "--compare",
                 str(tiny_dirs["llama"]), "--json"]) == 0
    captured = capsys.readouterr()
    r = json.loads(captured.out.strip().splitlines()[-1])
    for who in (r, r["original"]):
        acc, acc_norm = _acc(who)
        assert 0 <= acc <= 1 and 0 <= acc_norm <= 1 and who["n-samples"][TASK]["effective"] == 12
    assert TASK in r["table"] and "acc" in captured.err  # lm-eval's table, on stderr beside --json


def test_unknown_task_and_missing_lm_eval_are_one_line(tiny_dirs, capsys, monkeypatch):
    assert main(["eval", "lm-eval", str(tiny_dirs["llama"]), "--tasks", "no_such_task"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lm-eval knows no task 'no_such_task'" in err[0]
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    assert main(["eval", "lm-eval", str(tiny_dirs["llama"]), "--tasks", TASK]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install -e ".[eval]"' in err[0]
