"""Kill points: a child process running a command is killed (SIGKILL) at a named point (attnswap/faults.py);
afterwards the target is the old output if one existed (restored by the next run where the kill hit a swap),
absent if none existed, never partial; a rerun succeeds and leaves no scratch behind; an interrupted
fine-tune or evolution resumes to the result of an uninterrupted run. docs/reliability.md lists the points."""
import json
import signal

import pytest
import torch

import attnswap
from attnswap.cli import main
from attnswap.outputs import run_dir

from .conftest import WIKI_TEST, WIKI_TRAIN
from .faulty import attnswap_child, config_section, scratch, whole

KILLED = -signal.SIGKILL


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _after_kill(target, old_window, new_window):
    """What a kill may leave at the target: the old output, nothing (a kill mid-swap sets the old one aside),
    or the new one complete; never a partial one."""
    if not target.exists():
        return None
    assert whole(target), sorted(p.name for p in target.iterdir())
    window = config_section(target)["plan"]["attention"][0]["options"]["window"]
    assert window in (old_window, new_window)
    return window


@pytest.mark.parametrize("point", ["convert.staged", "convert.written", "convert.swap", "convert.swapped"])
def test_convert_killed_leaves_the_old_output(point, tiny_dirs, tmp_path, capsys):
    target = tmp_path / "sw"
    assert cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--set", "window=8", "--out",
               target)[0] == 0
    proc = attnswap_child("convert", tiny_dirs["llama"], "--to", "sliding-window", "--set", "window=16",
                          "--out", target, "--force", fault=f"{point}:kill")
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    left = _after_kill(target, 8, 16)
    if point == "convert.swap":  # between the two renames: the old output is aside, under attnswap's name
        assert left is None and any(".sw.attnswap-old-" in n for n in scratch(tmp_path))
    elif point == "convert.swapped":
        assert left == 16  # the new output is complete; only the removal of the old one was cut
    else:
        assert left == 8
    # the next run restores a set-aside output before anything else: without --force it is refused, untouched
    code, _, err = cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--set", "window=4",
                       "--out", target)
    assert code == 2 and "already exists" in err
    assert whole(target) and config_section(target)["plan"]["attention"][0]["options"]["window"] == (16 if point == "convert.swapped" else 8)
    assert scratch(tmp_path) == []
    assert cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--set", "window=4", "--out",
               target, "--force")[0] == 0
    assert whole(target) and config_section(target)["plan"]["attention"][0]["options"]["window"] == 4 and scratch(tmp_path) == []


def test_convert_killed_with_no_old_output_leaves_nothing(tiny_dirs, tmp_path, capsys):
    target = tmp_path / "sw"
    proc = attnswap_child("convert", tiny_dirs["llama"], "--to", "sliding-window", "--out", target,
                          fault="convert.written:kill")
    assert proc.returncode == KILLED
    assert not target.exists() and any(".sw.attnswap-tmp-" in n for n in scratch(tmp_path))
    assert cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--out", target)[0] == 0
    assert whole(target) and scratch(tmp_path) == []


@pytest.mark.parametrize("point", ["export.staged", "export.written", "export.swap"])
def test_export_killed_leaves_the_old_output(point, tiny_dirs, tmp_path, capsys):
    target = tmp_path / "exp"
    assert cli(capsys, "export", tiny_dirs["llama"], "--out", target)[0] == 0
    before = json.loads((target / "attnswap-manifest.json").read_text())["files"]
    proc = attnswap_child("export", tiny_dirs["llama"], "--out", target, "--dtype", "bf16", "--force",
                          fault=f"{point}:kill")
    assert proc.returncode == KILLED
    if point == "export.swap":
        assert not target.exists()
    else:
        assert whole(target) and json.loads((target / "attnswap-manifest.json").read_text())["files"] == before
    code, _, err = cli(capsys, "export", tiny_dirs["llama"], "--out", target)
    assert code == 2 and "already exists" in err  # restored first, then refused without --force
    assert whole(target) and json.loads((target / "attnswap-manifest.json").read_text())["files"] == before
    assert cli(capsys, "export", tiny_dirs["llama"], "--out", target, "--dtype", "bf16", "--force")[0] == 0
    assert whole(target) and scratch(tmp_path) == []
    assert attnswap.load(target).dtype == torch.float32  # loads (upcast from the bf16 export)


@pytest.fixture(scope="module")
def linear_dir(tiny_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("linear") / "lin"
    assert main(["convert", str(tiny_dirs["llama"]), "--to", "linear", "--set", "window=8", "--out", str(d)]) == 0
    return d


@pytest.mark.parametrize("point", ["distill.step@2", "distill.written", "distill.swap"])
def test_distill_killed_leaves_the_old_output(point, linear_dir, tmp_path, capsys):
    target = tmp_path / "dist"
    args = ["distill", linear_dir, "--data", WIKI_TRAIN, "--tokens", "128", "--seq-len", "32", "--out", target]
    assert cli(capsys, *args, "--lr", "1e-3")[0] == 0
    before = json.loads((target / "metrics.json").read_text())["distill"]["config"]["lr"]
    proc = attnswap_child(*args, "--lr", "1e-2", "--force", fault=f"{point}:kill")
    assert proc.returncode == KILLED
    assert not target.exists() if point == "distill.swap" else whole(target)
    code, _, err = cli(capsys, *args, "--lr", "1e-2")
    assert code == 2 and "already exists" in err
    assert json.loads((target / "metrics.json").read_text())["distill"]["config"]["lr"] == before
    assert cli(capsys, *args, "--lr", "1e-2", "--force")[0] == 0
    assert whole(target) and scratch(tmp_path) == []
    assert json.loads((target / "metrics.json").read_text())["distill"]["config"]["lr"] == 1e-2


FT = ["--data", WIKI_TRAIN, "--steps", "6", "--seq-len", "32", "--save-every", "2", "--lr", "1e-2", "--lora-r", "4"]


@pytest.fixture(scope="module")
def finetuned(tiny_dirs, tmp_path_factory):
    """An uninterrupted 6-step fine-tune: its digest and losses."""
    d = tmp_path_factory.mktemp("ft-ref") / "ft"
    assert main(["finetune", str(tiny_dirs["gpt2"]), *map(str, FT), "--out", str(d), "--json"]) == 0
    return json.loads((d / "metrics.json").read_text())["finetune"], json.loads((d / "losses.json").read_text())


@pytest.mark.parametrize("point", ["finetune.step@3", "finetune.checkpoint@2", "finetune.checkpoint_written@2",
                                   "finetune.swap"])
def test_finetune_killed_resumes_to_the_same_weights(point, tiny_dirs, finetuned, tmp_path, capsys):
    reference, losses = finetuned
    target = tmp_path / "ft"
    force = []
    if point == "finetune.swap":  # a swap happens over an old output
        assert cli(capsys, "finetune", tiny_dirs["gpt2"], *FT[:2], "--steps", "2", *FT[4:], "--out", target)[0] == 0
        force = ["--force"]
    proc = attnswap_child("finetune", tiny_dirs["gpt2"], *FT, "--out", target, *force, fault=f"{point}:kill")
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    run = run_dir(target)
    assert run.is_dir()  # the resumable run is kept
    assert not target.exists()  # nothing at the target until the run is complete (a swap: the old one is aside)
    code, out, err = cli(capsys, "finetune", tiny_dirs["gpt2"], *FT, "--out", target, "--resume", "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["digest"] == reference["digest"]
    assert json.loads((target / "losses.json").read_text()) == losses
    assert whole(target) and not run.exists() and scratch(tmp_path) == []
    assert not [p for p in (target / "checkpoints").iterdir() if p.name.startswith(".")]


EV = ["--data", WIKI_TEST, "--task", "ppl", "--context", "96", "--score-from", "48", "--budget", "0.25",
      "--interval", "16", "--population", "4", "--generations", "2", "--sigma", "0.5", "--seed", "0"]


def _timeless(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.fixture(scope="module")
def evolved(tiny_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("ev-ref") / "ev"
    assert main(["evolve", str(tiny_dirs["llama"]), *map(str, EV), "--out", str(d)]) == 0
    return json.loads((d / "evolve.json").read_text())["history"], (d / "namm.safetensors").read_bytes()


@pytest.mark.parametrize("point", ["evolve.candidate@7", "evolve.params@2", "evolve.state.written@2",
                                   "evolve.swap"])
def test_evolve_killed_resumes_to_the_same_history(point, tiny_dirs, evolved, tmp_path, capsys):
    history, params = evolved
    target = tmp_path / "ev"
    force = []
    if point == "evolve.swap":
        assert cli(capsys, "evolve", tiny_dirs["llama"], *EV[:-6], "--generations", "1", *EV[-4:], "--out",
                   target)[0] == 0
        force = ["--force"]
    proc = attnswap_child("evolve", tiny_dirs["llama"], *EV, "--out", target, *force, fault=f"{point}:kill")
    assert proc.returncode == KILLED, proc.stderr[-2000:]
    assert not target.exists() and run_dir(target).is_dir()  # generation 1 is saved in the run directory
    code, _, err = cli(capsys, "evolve", tiny_dirs["llama"], *EV, "--out", target)
    # an interrupted run is never discarded without --force (a swap's set-aside output is restored first)
    assert code == 2 and ("already exists" if point == "evolve.swap" else "--resume") in err
    code, _, err = cli(capsys, "evolve", tiny_dirs["llama"], *EV, "--out", target, "--resume")
    assert code == 0, err
    assert _timeless(json.loads((target / "evolve.json").read_text())["history"]) == _timeless(history)
    assert (target / "namm.safetensors").read_bytes() == params
    assert whole(target) and not run_dir(target).exists() and scratch(tmp_path) == []
