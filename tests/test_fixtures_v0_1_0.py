"""Checkpoints written by attnswap 0.1.0 (tests/fixtures/v0_1_0, made by its make.py at tag v0.1.0) load
with today's code and give the logits 0.1.0 computed; their folders count as attnswap's for --force."""
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import attnswap
from attnswap.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v0_1_0"
RECORDED = load_file(str(FIXTURES / "logits.safetensors"))
NAMES = sorted(k for k in RECORDED if k != "ids")


def test_every_method_has_a_fixture():
    """0.1.0 had one kind: its six variants (the memory variant is a cache policy now, lora-ensemble a tuner)."""
    made = {n.split("-bert")[0].split("-gpt2")[0].split("-export")[0].split("-member")[0] for n in NAMES}
    assert made == {"dex", "diff", "linear", "lora-ensemble", "memory", "mra", "sliding-window"}


@pytest.mark.parametrize("name", NAMES)
def test_a_0_1_0_checkpoint_loads_with_the_same_logits(name):
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    model = attnswap.load(FIXTURES / name, dtype=dtype)
    with torch.no_grad():
        out = model(input_ids=RECORDED["ids"])
    got = (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()
    assert got.shape == RECORDED[name].shape
    assert (got - RECORDED[name]).abs().max() <= 1e-5


def test_force_replaces_a_0_1_0_output(tmp_path, capsys):
    target = tmp_path / "old"
    shutil.copytree(FIXTURES / "linear-export-bf16", target)
    assert main(["convert", str(FIXTURES / "sliding-window"), "--to", "sliding-window", "--out", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err
    # a converted checkpoint cannot be converted again; export it over the old output instead
    assert main(["export", str(FIXTURES / "sliding-window"), "--out", str(target), "--force"]) == 0
    assert (target / "attnswap-manifest.json").is_file()
