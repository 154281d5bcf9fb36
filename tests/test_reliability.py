"""Nothing a user owns is lost: guarded paths, --force only over attnswap's own outputs, bad values refused
before work, checkpoints without code, finite or stop, one writer per output, disk full and Ctrl-C.
Each test is a row of docs/reliability.md."""
import json
import os
import shutil
import signal
import stat
import time

import pytest
import torch
import yaml

import attnswap
from attnswap import outputs
from attnswap.cli import main
from attnswap.outputs import run_dir

from .conftest import WIKI_TEST, WIKI_TRAIN, outputs as model_outputs, sample_ids
from .faulty import attnswap_child, config_section, scratch, wait_reached, whole


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code, err, *fragments, exit_code=2):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == exit_code, (code, err[-1500:])
    assert "Traceback" not in err and len(lines) == 1, err[-1500:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def tree(root):
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


@pytest.fixture
def parent(tiny_dirs, tmp_path):
    """parent/tiny: a user's model, parent/notes.txt: a user's file, parent/ft/x.txt: a user's data file."""
    root = tmp_path / "parent"
    shutil.copytree(tiny_dirs["llama"], root / "tiny")
    (root / "notes.txt").write_text("mine")
    (root / "ft").mkdir()
    (root / "ft" / "x.txt").write_text(WIKI_TRAIN.read_text()[:20000])
    return root


# ------------------------------------------------------------------------------------------- paths

@pytest.mark.parametrize("case", ["parent-of-source", "source", "data-folder", "cwd", "home", "root"])
def test_out_may_not_hold_an_input(case, parent, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(parent / "ft" if case == "cwd" else tmp_path / "work")
    before = tree(parent)
    convert = ["convert", parent / "tiny", "--to", "sliding-window", "--force", "--out"]
    args, fragment = {
        "parent-of-source": (convert + [parent], "contains the source model"),
        "source": (convert + [parent / "tiny"], "is the source model"),
        "data-folder": (["finetune", parent / "tiny", "--data", parent / "ft" / "x.txt", "--steps", "2", "--force",
                         "--out", parent / "ft"], "contains the data file"),
        "cwd": (convert + ["."], "is the working directory"),
        "home": (convert + ["~"], "is the home directory"),
        "root": (convert + ["/"], "is the root directory"),
    }[case]
    code, _, err = cli(capsys, *args)
    one_line(code, err, "refusing --out", fragment)
    assert tree(parent) == before


def test_recipe_out_may_not_hold_the_recipe_or_the_working_directory(parent, tmp_path, capsys, monkeypatch):
    recipe = parent / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "tiny", "convert": {"variant": "sliding-window"}}))
    monkeypatch.chdir(parent)
    before = tree(parent)
    code, _, err = cli(capsys, "run", recipe, "--out", ".", "--force")
    one_line(code, err, "refusing --out")
    code, _, err = cli(capsys, "run", recipe, "--out", parent.parent, "--force")
    one_line(code, err, "refusing --out")
    assert tree(parent) == before


def test_tilde_expands_in_path_options(tiny_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--out=~/x")[0] == 0
    assert whole(tmp_path / "home" / "x") and not (tmp_path / "~").exists()


def test_force_replaces_only_what_attnswap_wrote(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "sw"
    assert cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--out", out)[0] == 0
    (out / "my-notes.md").write_text("notes")
    code, _, err = cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--out", out, "--force")
    one_line(code, err, "'my-notes.md' in it was not written by attnswap")
    assert (out / "my-notes.md").read_text() == "notes"
    # a folder of someone else's files is refused whole, naming one
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data.bin").write_bytes(b"x")
    code, _, err = cli(capsys, "export", tiny_dirs["llama"], "--out", theirs, "--force")
    one_line(code, err, "'data.bin' in it was not written by attnswap")
    assert (theirs / "data.bin").read_bytes() == b"x"


def test_outputs_of_0_1_0_are_recognised(tiny_dirs, tmp_path, capsys):
    """0.1.0 wrote no manifest: its outputs are known by their attnswap section, results.json or checkpoints."""
    legacy = tmp_path / "old"
    shutil.copytree(tiny_dirs["llama"], legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    cfg["attnswap"] = {"variant": "sliding-window", "options": {"window": 8, "sinks": 0}, "layers": [0, 1]}
    (legacy / "config.json").write_text(json.dumps(cfg))
    (legacy / "checkpoints" / "step-000002").mkdir(parents=True)
    (legacy / "checkpoints" / "step-000002" / "optim.pt").write_bytes(b"")
    assert cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--out", legacy, "--force")[0] == 0
    assert whole(legacy)
    # with a file 0.1.0 never wrote in it, it is refused
    stranger = tmp_path / "old2"
    shutil.copytree(tiny_dirs["llama"], stranger)
    (stranger / "results.json").write_text("{}")
    (stranger / "thesis.tex").write_text("x")
    code, _, err = cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--out", stranger, "--force")
    one_line(code, err, "'thesis.tex'")
    # no attnswap marks at all: refused
    plain = tmp_path / "plain"
    shutil.copytree(tiny_dirs["llama"], plain)
    code, _, err = cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--out", plain, "--force")
    one_line(code, err, "not written by attnswap")


def test_stale_scratch_of_dead_runs_is_removed(tiny_dirs, tmp_path, capsys):
    (tmp_path / ".sw.attnswap-tmp-dead1").mkdir()
    (tmp_path / ".sw.attnswap-tmp-dead1" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".sw.tmp-k3j_x9q2").mkdir()  # 0.1.0's staging name (mkdtemp)
    (tmp_path / ".sw.tmp-my-notes.txt").write_text("a user's file that only looks like scratch")
    assert cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--out", tmp_path / "sw")[0] == 0
    assert scratch(tmp_path) == [] and not (tmp_path / ".sw.tmp-k3j_x9q2").exists()
    assert (tmp_path / ".sw.tmp-my-notes.txt").read_text().startswith("a user's file")


def test_outputs_get_normal_permissions(tiny_dirs, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert cli(capsys, "export", tiny_dirs["llama"], "--out", tmp_path / "exp")[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "exp").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "exp").iterdir()} == {0o644}


def test_recipe_paths_resolve_against_the_recipe_folder(tiny_dirs, tmp_path, monkeypatch):
    from attnswap.recipe import load_recipe

    folder = tmp_path / "project"
    shutil.copytree(tiny_dirs["llama"], folder / "models" / "tiny")
    (folder / "data").mkdir()
    shutil.copy(WIKI_TEST, folder / "data" / "test.txt")
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump({"model": "models/tiny", "convert": {"variant": "sliding-window"},
                                    "eval": {"data": "data/test.txt", "max_tokens": 256, "seq_len": 64},
                                    "out": "runs/a"}))
    seen = []
    for cwd in (tmp_path, folder / "data"):
        monkeypatch.chdir(cwd)
        recipe, _ = load_recipe(path)
        seen.append((recipe.model, recipe.eval.data, recipe.out))
    assert seen[0] == seen[1] == (str(folder / "models" / "tiny"), str(folder / "data" / "test.txt"),
                                  str(folder / "runs" / "a"))


# ------------------------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("flags,fragment", [
    (["--seq-len", "0"], "--seq-len"),
    (["--seq-len", "-1"], "--seq-len"),
    (["--max-tokens", "1"], "--max-tokens"),
    (["--max-tokens", "100", "--seq-len", "200"], "shorter than one window"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seq-len", "4096"], "beyond the model's 512 maximum positions"),
    (["--seq-len", "512", "--batch-size", "100000000"], "needs at least"),
], ids=["seq-len-0", "seq-len-negative", "max-tokens-1", "max-tokens-below-one-window", "batch-size-0",
        "beyond-the-positions", "beyond-memory"])
def test_bad_eval_values_are_one_line_before_work(flags, fragment, tiny_dirs, capsys):
    code, _, err = cli(capsys, "eval", "perplexity", tiny_dirs["llama"], "--data", WIKI_TEST, *flags)
    one_line(code, err, fragment)


def test_lengths_beyond_the_positions(tiny_dirs, tmp_path, capsys):
    code, _, err = cli(capsys, "finetune", tiny_dirs["llama"], "--data", WIKI_TRAIN, "--steps", "1", "--seq-len",
                       "600", "--out", tmp_path / "ft")
    one_line(code, err, "beyond the model's 512 maximum positions", "--allow-long")
    code, _, err = cli(capsys, "eval", "perplexity", tiny_dirs["gpt2"], "--data", WIKI_TEST, "--seq-len", "600",
                       "--allow-long")
    one_line(code, err, "learned position embeddings")  # no opting in past learned positions
    # rotary positions with --allow-long: runs (speed measurements)
    code, out, err = cli(capsys, "eval", "perplexity", tiny_dirs["llama"], "--data", WIKI_TEST, "--seq-len", "600",
                         "--max-tokens", "600", "--allow-long", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["seq_len"] == 600
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--variant-lr", "inf"),
                                        ("--lora-alpha", "nan")], ids=["lr-inf", "lr-nan", "variant-lr-inf",
                                                                        "lora-alpha-nan"])
def test_non_finite_options_are_refused(flag, value, tiny_dirs, tmp_path, capsys):
    code, _, err = cli(capsys, "finetune", tiny_dirs["llama"], "--data", WIKI_TRAIN, "--steps", "2", flag, value,
                       "--out", tmp_path / "ft")
    one_line(code, err, flag, "finite")
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("step,fragment", [
    ({"eval": {"data": "D", "max_tokens": 100, "seq_len": 1024}}, "shorter than one window"),
    ({"eval": {"data": "D", "seq_len": 4096, "max_tokens": 8192}}, "eval.seq_len 4096 is beyond"),
    ({"finetune": {"data": "D", "steps": 2, "seq_len": 0}}, "finetune.seq_len"),
    ({"finetune": {"data": "D", "steps": 2, "lr": float("inf")}}, "finetune.lr"),
], ids=["eval-max-tokens-below-one-window", "eval-beyond-the-positions", "finetune-seq-len-0", "finetune-lr-inf"])
def test_recipe_is_validated_in_full_before_any_step(step, fragment, tiny_dirs, tmp_path, capsys):
    recipe = {"model": str(tiny_dirs["llama"]), "convert": {"variant": "sliding-window"}}
    for k, v in step.items():
        recipe[k] = {kk: (str(WIKI_TEST) if vv == "D" else vv) for kk, vv in v.items()}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = cli(capsys, "run", path, "--out", tmp_path / "run")
    one_line(code, err, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


# ------------------------------------------------------------------------------------------- checkpoints

FT = ["--data", WIKI_TRAIN, "--seq-len", "32", "--save-every", "2", "--lr", "1e-2", "--lora-r", "4"]


def _interrupted_run(tiny_dirs, target, capsys, steps=6):
    """A fine-tune stopped after step 5 by Ctrl-C (fault point), checkpoints at 2 and 4 in its run directory."""
    os.environ["ATTNSWAP_FAULT"] = "finetune.step@5:interrupt"
    try:
        from attnswap import faults

        faults._hits.clear()
        code, _, err = cli(capsys, "finetune", tiny_dirs["gpt2"], *FT, "--steps", str(steps), "--out", target)
    finally:
        del os.environ["ATTNSWAP_FAULT"]
    one_line(code, err, "interrupted", "--resume", exit_code=130)
    run = run_dir(target)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    return run


def _resume(tiny_dirs, target, capsys, *extra):
    code, out, err = cli(capsys, "finetune", tiny_dirs["gpt2"], *FT, "--steps", "6", "--out", target, "--resume",
                         "--json", *extra)
    return code, out, err


@pytest.fixture(scope="module")
def straight(tiny_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("straight") / "ft"
    assert main(["finetune", str(tiny_dirs["gpt2"]), *map(str, FT), "--steps", "6", "--out", str(d)]) == 0
    return json.loads((d / "metrics.json").read_text())["finetune"]["digest"]


def test_a_truncated_newest_checkpoint_is_skipped(tiny_dirs, straight, tmp_path, capsys):
    run = _interrupted_run(tiny_dirs, tmp_path / "ft", capsys)
    newest = run / "checkpoints" / "step-000004" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    code, out, err = _resume(tiny_dirs, tmp_path / "ft", capsys)
    assert code == 0, err
    assert "skipping checkpoint step-000004" in err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["resumed_from"] == 2 and result["digest"] == straight


def test_a_planted_pickle_runs_nothing(tiny_dirs, tmp_path, capsys):
    """optim.pt (0.1.0's format) holding an object whose unpickling would create a file: refused, one line."""
    run = _interrupted_run(tiny_dirs, tmp_path / "ft", capsys)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "training.safetensors").unlink()
        (ckpt / "attnswap-manifest.json").unlink()
        torch.save({"optimizer": Payload(), "scheduler": {}, "rng": []}, ckpt / "optim.pt")
    code, _, err = _resume(tiny_dirs, tmp_path / "ft", capsys)
    one_line(code, err, "cannot resume", "never run")
    assert not marker.exists()
    # a pickle in place of the weights file: the checksum catches it, no intact checkpoint is left
    run2 = _interrupted_run(tiny_dirs, tmp_path / "ft2", capsys)
    for ckpt in (run2 / "checkpoints").iterdir():
        torch.save(Payload(), ckpt / "trainable.safetensors")
    code, _, err = cli(capsys, "finetune", tiny_dirs["gpt2"], *FT, "--steps", "6", "--out", tmp_path / "ft2",
                       "--resume")
    one_line(code, err, "nothing to resume")
    assert not marker.exists()


def test_resume_applies_a_changed_lr(tiny_dirs, straight, tmp_path, capsys):
    _interrupted_run(tiny_dirs, tmp_path / "same", capsys)
    code, out, _ = _resume(tiny_dirs, tmp_path / "same", capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["digest"] == straight
    _interrupted_run(tiny_dirs, tmp_path / "lower", capsys)
    code, out, err = cli(capsys, "finetune", tiny_dirs["gpt2"], *FT[:-4], "--lr", "1e-3", *FT[-2:], "--steps", "6",
                         "--out", tmp_path / "lower", "--resume", "--json")
    assert code == 0, err
    assert "lr 0.01 -> 0.001" in err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["digest"] != straight  # the new rate was used
    assert result["resumes"] == [{"step": 4, "changed": {"lr": [0.01, 0.001]}}]
    metrics = json.loads((tmp_path / "lower" / "metrics.json").read_text())["finetune"]
    assert metrics["lr"] == 0.001 and metrics["resumes"] == result["resumes"]
    # options resume cannot honour are refused
    _interrupted_run(tiny_dirs, tmp_path / "seq", capsys)
    code, _, err = cli(capsys, "finetune", tiny_dirs["gpt2"], *FT[:2], "--seq-len", "16", *FT[4:], "--steps", "6",
                       "--out", tmp_path / "seq", "--resume")
    one_line(code, err, "--resume with different seq_len")


# ------------------------------------------------------------------------------------------- finite or stop

def test_divergence_stops_with_finite_checkpoints(tiny_dirs, tmp_path, capsys):
    code, _, err = cli(capsys, "finetune", tiny_dirs["llama"], "--data", WIKI_TRAIN, "--steps", "8", "--seq-len",
                       "32", "--save-every", "1", "--warmup", "0", "--lr", "1e30", "--out", tmp_path / "ft")
    one_line(code, err, "became", exit_code=3)
    assert not (tmp_path / "ft").exists()
    from safetensors.torch import load_file

    ckpts = sorted((run_dir(tmp_path / "ft") / "checkpoints").glob("step-*"))
    for ckpt in ckpts:  # every checkpoint left is loadable and finite
        assert whole(ckpt)
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "trainable.safetensors").values())
    if ckpts:
        assert ckpts[-1].name in err


def test_export_refuses_an_fp16_overflow_or_keeps_fp32(tiny_dirs, tmp_path, capsys):
    big = tmp_path / "big"
    model = attnswap.load_model(tiny_dirs["llama"])
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6
    attnswap.save(model, big, tokenizer=attnswap.load_tokenizer(tiny_dirs["llama"]))
    code, _, err = cli(capsys, "export", big, "--out", tmp_path / "fp16", "--dtype", "fp16")
    one_line(code, err, "model.layers.0.mlp.up_proj.weight", "--keep-fp32", exit_code=3)
    assert not (tmp_path / "fp16").exists()
    code, _, err = cli(capsys, "export", big, "--out", tmp_path / "fp16", "--dtype", "fp16", "--keep-fp32")
    assert code == 0, err
    from safetensors import safe_open

    with safe_open(tmp_path / "fp16" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float16
    assert "up_proj" in (tmp_path / "fp16" / "README.md").read_text()


def test_non_finite_weights_are_never_saved_and_never_evaluated(tiny_dirs, tmp_path, capsys):
    model = attnswap.load_model(tiny_dirs["llama"])
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.fill_(float("nan"))
    with pytest.raises(attnswap.AttnswapError, match="non-finite values in 'model.layers.1.self_attn.q_proj"):
        attnswap.save(model, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    model.save_pretrained(tmp_path / "nan-by-hand")  # a broken model made elsewhere
    for f in tiny_dirs["llama"].glob("*token*"):
        shutil.copy(f, tmp_path / "nan-by-hand")
    code, _, err = cli(capsys, "eval", "perplexity", tmp_path / "nan-by-hand", "--data", WIKI_TEST, "--max-tokens",
                       "256", "--seq-len", "64")
    one_line(code, err, "not finite", exit_code=3)
    code, _, err = cli(capsys, "export", tmp_path / "nan-by-hand", "--out", tmp_path / "exp")
    one_line(code, err, "non-finite", exit_code=3)


# ------------------------------------------------------------------------------------------- one writer

@pytest.mark.parametrize("command", ["convert", "finetune"])
def test_two_writers_on_one_out(command, tiny_dirs, tmp_path, capsys):
    out, hold = tmp_path / "out", tmp_path / "hold"
    hold.mkdir()
    args = {"convert": ["convert", tiny_dirs["llama"], "--to", "sliding-window", "--set", "window=8"],
            "finetune": ["finetune", tiny_dirs["llama"], "--data", WIKI_TRAIN, "--steps", "2", "--seq-len", "32"]}
    first = attnswap_child(*args[command], "--out", out, fault=f"{command}.staged:hold", fault_dir=hold, wait=False)
    try:
        wait_reached(hold, first)
        # the second fails at once on the lock, with one line, while the first still holds it
        t0 = time.monotonic()
        code, _, err = cli(capsys, *args[command], "--out", out, "--force")
        one_line(code, err, "another attnswap process is writing")
        assert time.monotonic() - t0 < 30 and first.poll() is None
    finally:
        (hold / "release").touch()
    assert first.wait(timeout=120) == 0, first.stderr.read()[-2000:]
    assert whole(out) and scratch(tmp_path) == [] and not run_dir(out).exists()
    if command == "convert":
        assert config_section(out)["plan"]["attention"][0]["options"]["window"] == 8
    else:
        assert len(json.loads((out / "losses.json").read_text())) == 2


def test_an_output_that_appears_meanwhile_is_not_replaced(tiny_dirs, tmp_path):
    out, hold = tmp_path / "sw", tmp_path / "hold"
    hold.mkdir()
    first = attnswap_child("convert", tiny_dirs["llama"], "--to", "sliding-window", "--out", out,
                           fault="convert.written:hold", fault_dir=hold, wait=False)
    try:
        wait_reached(hold, first)
        out.mkdir()
        (out / "mine.txt").write_text("made while attnswap worked")
    finally:
        (hold / "release").touch()
    assert first.wait(timeout=120) == 2
    err = first.stderr.read()
    assert "appeared while this run worked" in err and "Traceback" not in err
    assert (out / "mine.txt").read_text() == "made while attnswap worked" and scratch(tmp_path) == []


@pytest.mark.slow
def test_two_first_loads_share_one_gguf_conversion(tmp_path):
    """Two processes load SmolLM2's GGUF into an empty cache at once: one converts, the other waits for it."""
    cache, hold = tmp_path / "cache", tmp_path / "hold"
    hold.mkdir()
    load = ["-c", "import attnswap, sys; m = attnswap.load_model('smollm2-135m'); "
                  "print(sum(float(p.double().sum()) for p in m.parameters()))"]
    import subprocess
    import sys

    from .faulty import child_env

    first = subprocess.Popen([sys.executable, *load], env=child_env("cache.written:hold", hold, ATTNSWAP_CACHE=str(cache)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_reached(hold, first)
        second = subprocess.Popen([sys.executable, *load], env=child_env(ATTNSWAP_CACHE=str(cache)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(5)  # the second reaches the cache's lock and waits there
        assert second.poll() is None
        assert [p.name for p in (cache / "gguf").iterdir() if not p.name.startswith(".")] == []
    finally:
        (hold / "release").touch()
    outs = [p.communicate(timeout=600) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [o[1][-1500:] for o in outs]
    assert outs[0][0].strip() == outs[1][0].strip()
    entries = list((cache / "gguf").iterdir())
    assert len(entries) == 1 and whole(entries[0]), [p.name for p in entries]


# ------------------------------------------------------------------------------------------- disk, Ctrl-C

@pytest.mark.parametrize("action,fragment", [("enospc", "No space left on device"), ("eacces", "Permission denied")],
                         ids=["enospc", "eacces"])
def test_a_failed_write_leaves_the_old_output(action, fragment, tiny_dirs, tmp_path, capsys, monkeypatch):
    from attnswap import faults

    out = tmp_path / "sw"
    assert cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--set", "window=8", "--out", out)[0] == 0
    before = tree(out)
    monkeypatch.setenv("ATTNSWAP_FAULT", f"convert.written:{action}")
    faults._hits.clear()
    code, _, err = cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--out", out, "--force")
    one_line(code, err, "could not write", fragment, exit_code=4)
    assert tree(out) == before and scratch(tmp_path) == []


def test_ctrl_c_leaves_no_temp_folders(tiny_dirs, tmp_path):
    out, hold = tmp_path / "sw", tmp_path / "hold"
    hold.mkdir()
    proc = attnswap_child("convert", tiny_dirs["llama"], "--to", "sliding-window", "--out", out,
                          fault="convert.staged:hold", fault_dir=hold, wait=False)
    wait_reached(hold, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read()
    assert "error: interrupted" in err and "Traceback" not in err
    assert not out.exists() and scratch(tmp_path) == []


def test_library_save_and_load_round_trip_is_unchanged(tiny_dirs, tmp_path):
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "sliding-window", window=8)
    attnswap.save(model, tmp_path / "a")
    ids = sample_ids(model.config.vocab_size, length=20)
    assert (model_outputs(attnswap.load(tmp_path / "a"), ids) - model_outputs(model, ids)).abs().max() == 0
    assert whole(tmp_path / "a")
    with pytest.raises(attnswap.AttnswapError, match="already exists"):
        attnswap.save(model, tmp_path / "a")
    assert outputs.verify(tmp_path / "a") is None
