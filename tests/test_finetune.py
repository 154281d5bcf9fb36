import json
import subprocess
import sys

import pytest
import torch

import attnswap
from attnswap.config import FinetuneConfig
from attnswap.outputs import run_dir
from attnswap.train import finetune

from .conftest import WIKI_TRAIN, outputs, sample_ids


def _cfg(**kw):
    base = dict(data=str(WIKI_TRAIN), steps=10, seq_len=64, lr=3e-3, warmup=2, save_every=5, lora_r=4)
    return FinetuneConfig(**{**base, **kw})


def test_loss_goes_down_over_50_steps(tiny_dirs, tiny_tokenizer, tmp_path):
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "sliding-window", window=16, sinks=2)
    r = finetune(model, tiny_tokenizer, _cfg(steps=50, lr=3e-2, save_every=25, batch_size=2), tmp_path / "ft",
                 progress=False)
    losses = json.loads((tmp_path / "ft" / "losses.json").read_text())
    assert len(losses) == 50
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.2, (first, last)
    assert r["steps"] == 50 and r["world_size"] == 1
    # the written model is the trained one: LoRA adapter beside the converted base
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").is_file()
    loaded = attnswap.load(tmp_path / "ft", merge_lora=True)
    assert loaded.config.attnswap["plan"]["attention"][0]["method"] == "sliding-window"
    ids = sample_ids(loaded.config.vocab_size, length=20)
    trained = attnswap.load(tmp_path / "ft")  # PEFT-wrapped, unmerged
    assert (outputs(loaded, ids) - outputs(trained, ids)).abs().max() <= 1e-4
    untrained = attnswap.load_model(tiny_dirs["llama"])
    assert (outputs(loaded, ids) - outputs(untrained, ids)).abs().max() > 1e-3


def test_resume_continues_to_the_same_weights(tiny_dirs, tiny_tokenizer, tmp_path):
    """Interrupted after step 7 (checkpoint at 5), resumed: same step count, same losses, same weights."""
    cfg = _cfg()
    full = finetune(attnswap.load_model(tiny_dirs["gpt2"]), tiny_tokenizer, cfg, tmp_path / "a", progress=False)

    def interrupt(step, loss):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(attnswap.load_model(tiny_dirs["gpt2"]), tiny_tokenizer, cfg, tmp_path / "b", progress=False,
                 on_step=interrupt)
    run = run_dir(tmp_path / "b")  # the interrupted run is kept beside the output, which does not exist yet
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000005"]
    assert not (tmp_path / "b").exists()  # no half-written model
    resumed = finetune(attnswap.load_model(tiny_dirs["gpt2"]), tiny_tokenizer, cfg, tmp_path / "b", resume=True,
                       progress=False)
    assert resumed["resumed_from"] == 5 and resumed["steps"] == 10
    assert json.loads((tmp_path / "b" / "losses.json").read_text()) == json.loads((tmp_path / "a" / "losses.json").read_text())
    assert resumed["digest"] == full["digest"]


def test_nan_loss_stops_with_the_last_checkpoint_intact(tiny_dirs, tiny_tokenizer, tmp_path):
    model = attnswap.load_model(tiny_dirs["llama"])

    def poison(step, loss):
        if step == 6:  # after the step-5 checkpoint, break the weights
            with torch.no_grad():
                model.get_input_embeddings().weight.fill_(float("nan"))

    with pytest.raises(attnswap.AttnswapError, match="loss became nan at step 7.*step-000005"):
        finetune(model, tiny_tokenizer, _cfg(), tmp_path / "n", progress=False, on_step=poison)
    assert not (tmp_path / "n").exists()
    state = json.loads((run_dir(tmp_path / "n") / "checkpoints" / "step-000005" / "state.json").read_text())
    assert state["step"] == 5 and all(v == v for v in state["losses"])


@pytest.mark.slow
def test_smollm2_sliding_window_finetunes_a_few_steps(tmp_path):
    """Acceptance: SmolLM2 + sliding-window on the Wikipedia training text, through the CLI."""
    from attnswap.cli import main

    assert main(["convert", "smollm2-135m", "--to", "sliding-window", "--set", "window=64", "--set", "sinks=4",
                 "--out", str(tmp_path / "sw")]) == 0
    code = main(["finetune", str(tmp_path / "sw"), "--data", str(WIKI_TRAIN), "--steps", "3", "--seq-len", "128",
                 "--save-every", "2", "--out", str(tmp_path / "ft"), "--json"])
    assert code == 0
    assert (tmp_path / "ft" / "checkpoints" / "step-000003").is_dir()
    model = attnswap.load(tmp_path / "ft", merge_lora=True)
    assert model.config.attnswap["plan"]["attention"][0]["options"] == {"window": 64, "sinks": 4}


def test_two_process_data_parallel_on_cpu(tiny_dirs, tmp_path):
    """torchrun --nproc_per_node 2: accelerate sees world size 2 (gloo); both ranks end with equal weights."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "attnswap", "finetune", str(tiny_dirs["llama"]), "--data", str(WIKI_TRAIN), "--steps", "4",
           "--seq-len", "32", "--save-every", "2", "--lr", "1e-2", "--out", str(tmp_path / "ddp"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world_size"] == 2 for r in results)
    assert results[0]["digest"] == results[1]["digest"]
    # ranks read different rows: 4 steps x 2 ranks x 32 tokens
    assert results[0]["tokens"] == 4 * 2 * 32
    assert (tmp_path / "ddp" / "config.json").is_file()


def _kl(original, converted, ids):
    with torch.no_grad():
        p = original(input_ids=ids).logits.float().log_softmax(-1)
        q = converted(input_ids=ids).logits.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_kl_loss_is_the_kl_to_the_original_and_goes_down(tiny_dirs, tiny_tokenizer, tmp_path):
    """--loss kl: the first step's loss is KL(original || converted) computed by hand on the same window (the
    LoRA starts at zero); training lowers it; an exact conversion starts at KL 0."""
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "sliding-window", window=8, sinks=1)
    cfg = _cfg(steps=40, lr=2e-2, save_every=40, loss="kl")
    from attnswap.data import training_ids, windows

    first = windows(training_ids(tiny_tokenizer, cfg.data, cfg.steps * cfg.seq_len), cfg.seq_len)[:1]
    expected = _kl(attnswap.load_model(tiny_dirs["llama"]), model, first)
    assert expected > 1e-3
    finetune(model, tiny_tokenizer, cfg, tmp_path / "kl", progress=False)
    losses = json.loads((tmp_path / "kl" / "losses.json").read_text())
    assert losses[0] == pytest.approx(expected, rel=1e-3)
    after = _kl(attnswap.load_model(tiny_dirs["llama"]), attnswap.load(tmp_path / "kl", merge_lora=True), first)
    assert after < 0.95 * expected, (expected, after)  # measured 0.545 -> 0.508
    exact = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(exact, "sliding-window", window=64, sinks=0)  # window >= seq_len: the original attention
    finetune(exact, tiny_tokenizer, _cfg(steps=1, loss="kl", save_every=1), tmp_path / "exact", progress=False)
    assert json.loads((tmp_path / "exact" / "losses.json").read_text())[0] <= 1e-6


def test_kl_loss_with_a_tuner_is_a_one_line_error(tiny_dirs, tiny_tokenizer, tmp_path):
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "lora-ensemble", members=2)
    with pytest.raises(attnswap.AttnswapError, match="--loss kl .* tuner"):
        finetune(model, tiny_tokenizer, _cfg(loss="kl", lora_r=0), tmp_path / "t", progress=False)
