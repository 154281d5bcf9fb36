"""`finetune` and `distill` with `--parallel fsdp` under torchrun on 2 CPU processes (gloo): the parameters
are really sharded (each rank holds half of every tensor's rows while it trains), and the result equals one
process taking both ranks' batches."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import attnswap
from attnswap.cli import main

from .conftest import WIKI_TRAIN, outputs, sample_ids

pytestmark = pytest.mark.filterwarnings("ignore")


def _torchrun(args, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "attnswap", *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    return results


def _weights(d):
    out = {}
    for f in sorted(d.rglob("*.safetensors")):
        if "checkpoints" not in f.parts:
            out.update({f"{f.parent.relative_to(d)}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def _assert_sharded(results):
    for r in results:
        assert r["world_size"] == 2
        # every parameter is a DTensor whose local shard holds half of its rows (the tiny model's dims are even)
        assert r["shard_fraction"] == pytest.approx(0.5, abs=1e-4)


def test_fsdp_distill_equals_one_process(tiny_dirs, tmp_path):
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "linear", feature_map="hedgehog", window=4, sinks=1, mix_init=0.5, seed=0)
    attnswap.save(model, tmp_path / "c", tokenizer=attnswap.load_tokenizer(tiny_dirs["llama"]))
    common = ["distill", str(tmp_path / "c"), "--data", str(WIKI_TRAIN), "--tokens", str(6 * 2 * 32), "--seq-len",
              "32", "--lr", "3e-2"]
    results = _torchrun([*common, "--batch-size", "1", "--parallel", "fsdp", "--out", str(tmp_path / "fsdp")], 29531)
    _assert_sharded(results)
    assert all(r["steps"] == 6 and r["tokens"] == 6 * 2 * 32 for r in results)
    assert main([*common, "--batch-size", "2", "--out", str(tmp_path / "one")]) == 0
    sharded, one = _weights(tmp_path / "fsdp"), _weights(tmp_path / "one")
    trained = [k for k in one if ".attnswap." in k]
    assert trained and sorted(sharded) == sorted(one)
    start = _weights(tmp_path / "c")
    assert max((one[k] - start[k]).abs().max().item() for k in trained) > 1e-2  # it trained
    assert max((sharded[k] - one[k]).abs().max().item() for k in one) < 1e-5
    assert results[0]["layer_loss_final"] == pytest.approx(
        json.loads((tmp_path / "one" / "metrics.json").read_text())["distill"]["layer_loss_final"], rel=1e-3)


def test_fsdp_finetune_with_resume_equals_one_process(tiny_dirs, tmp_path):
    """2 steps, then --resume to 4 (the checkpoint's optimizer state is gathered when written and sharded again
    when read), against the same in one process with batch 2."""
    common = ["finetune", str(tiny_dirs["llama"]), "--data", str(WIKI_TRAIN), "--seq-len", "32", "--lr", "1e-2",
              "--warmup", "0", "--save-every", "2", "--lora-r", "4"]
    first = _torchrun([*common, "--steps", "2", "--batch-size", "1", "--parallel", "fsdp",
                       "--out", str(tmp_path / "fsdp")], 29533)
    _assert_sharded(first)
    results = _torchrun([*common, "--steps", "4", "--batch-size", "1", "--parallel", "fsdp", "--resume",
                         "--out", str(tmp_path / "fsdp")], 29535)
    _assert_sharded(results)
    assert results[0]["digest"] == results[1]["digest"] and results[0]["resumed_from"] == 2
    assert main([*common, "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--steps", "4", "--batch-size", "2", "--resume", "--out", str(tmp_path / "one")]) == 0
    sharded, one = _weights(tmp_path / "fsdp"), _weights(tmp_path / "one")
    lora = [k for k in one if "lora_" in k]
    assert lora and sorted(sharded) == sorted(one)
    assert max((sharded[k] - one[k]).abs().max().item() for k in one) < 1e-5
    losses = [json.loads((tmp_path / d / "losses.json").read_text()) for d in ("fsdp", "one")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-4) and len(losses[0]) == 4
    # the written model loads as any other and gives the one-process model's logits
    a, b = attnswap.load(tmp_path / "fsdp", merge_lora=True), attnswap.load(tmp_path / "one", merge_lora=True)
    ids = sample_ids(a.config.vocab_size, length=20)
    assert (outputs(a, ids) - outputs(b, ids)).abs().max() < 1e-4


def test_unshard_leaves_a_plain_model():
    """parallel.unshard on a 1-process mesh: no DTensor, no FSDP class or hook is left, tied weights stay tied,
    and the logits are the ones before sharding."""
    import os

    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnswap import parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29537")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
        ids = torch.randint(0, 64, (1, 11))
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        parallel.shard_model(model)
        assert parallel.is_sharded(model)
        parallel.unshard(model)
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        assert not any(isinstance(m, FSDPModule) for m in model.modules())
        assert not any(isinstance(p, DTensor) for p in model.parameters())
        assert model.lm_head.weight is model.model.embed_tokens.weight
        hooks = [h for m in model.modules() for d in (m._forward_pre_hooks, m._forward_hooks, m._state_dict_pre_hooks,
                                                      m._load_state_dict_pre_hooks, m._load_state_dict_post_hooks)
                 for h in d.values()]
        assert hooks == []
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, ref)
        assert all(isinstance(v, torch.Tensor) and not isinstance(v, DTensor) for v in model.state_dict().values())
    finally:
        dist.destroy_process_group()
