import json
from pathlib import Path

import pytest
import torch
import yaml

import attnswap
from attnswap.cli import main
from attnswap.recipe import load_recipe, validate

from .conftest import WIKI_TEST, WIKI_TRAIN, outputs, sample_ids

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # recipe paths are relative to the recipe's folder, not the working directory
    recipe, _ = load_recipe(path)
    assert validate(recipe, str(tmp_path / "run"), force=False) == tmp_path / "run"
    assert not (tmp_path / "run").exists()


def test_tiny_recipe_end_to_end(tiny_dirs, tmp_path, capsys):
    recipe = {
        "model": str(tiny_dirs["llama"]),
        "convert": {"to": "sliding-window", "options": {"window": 16, "sinks": 2}, "layers": "0-1"},
        "finetune": {"data": str(WIKI_TRAIN), "steps": 4, "seq_len": 32, "lr": 1e-2, "save_every": 2},
        "eval": {"data": str(WIKI_TEST), "max_tokens": 600, "seq_len": 64},
        "export": {"merge_lora": True, "dtype": "fp32"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ev = result["eval"]
    assert ev["tokens"] == 9 * 63 and ev["original"]["tokens"] == 9 * 63
    assert ev["ratio"] == pytest.approx(ev["perplexity"] / ev["original"]["perplexity"])
    final = tmp_path / "run" / "final"
    card = (final / "README.md").read_text()
    assert "sliding-window" in card and f"{ev['perplexity']:.3f}" in card and "## Recipe" in card
    assert (final / "recipe.yaml").read_text() == path.read_text()
    assert not (final / "adapter").exists()  # merged
    # the export gives the logits of the fine-tuned model
    ids = sample_ids(64, length=30)
    finetuned = attnswap.load(tmp_path / "run" / "finetuned", merge_lora=True)
    exported = attnswap.load(final)
    assert (outputs(exported, ids) - outputs(finetuned, ids)).abs().max() <= 1e-5
    assert exported.config.attnswap["export"] == {"dtype": "fp32", "merged_lora": True}


def test_encoder_recipe_distills_retrieves_and_the_card_says_so(tiny_dirs, tmp_path, capsys):
    """An encoder recipe: linformer -> distill -> eval retrieval (beside the recipe's model by default) -> export;
    the model card holds each layer's held-out loss before and after, and the retrieval table."""
    recipe = {
        "model": str(tiny_dirs["bert"]),
        "convert": {"to": "linformer", "options": {"rank": 8}},
        "distill": {"data": str(WIKI_TRAIN), "tokens": 20 * 64, "seq_len": 64, "lr": 1e-3},
        "eval_retrieval": {"data": str(WIKI_TEST), "passages": 12, "length": 32},
        "export": {"dtype": "fp32"},
    }
    path = tmp_path / "enc.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rv, ds = r["eval_retrieval"], r["distill"]
    assert rv["passages"] == 12 and rv["original"]["passages"] == 12 and 0 <= rv["top10_overlap"] <= 1
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    for layer, after in ds["layer_loss_final"].items():
        assert after < ds["layer_loss_start"][layer]
        assert f"| {layer} | {ds['layer_loss_start'][layer]:.5f} | {after:.5f} |" in card
    assert f"| converted | {rv['accuracy_at_1']:.4f} | {rv['mrr']:.4f} | {rv['top10_overlap']:.4f} |" in card
    assert f"| original | {rv['original']['accuracy_at_1']:.4f} | {rv['original']['mrr']:.4f} | 1 |" in card


def test_export_keeps_or_merges_lora_and_casts(tiny_dirs, tiny_tokenizer, tmp_path):
    from attnswap.config import FinetuneConfig
    from attnswap.export import export
    from attnswap.train import finetune

    model = attnswap.load_model(tiny_dirs["gpt2"])
    attnswap.convert(model, "sliding-window", window=8, sinks=1)
    finetune(model, tiny_tokenizer, FinetuneConfig(data=str(WIKI_TRAIN), steps=3, seq_len=32, lr=1e-2), tmp_path / "ft",
             progress=False)
    ids = sample_ids(tiny_tokenizer.vocab_size, length=25)
    ref = outputs(attnswap.load(tmp_path / "ft", merge_lora=True), ids)

    export(tmp_path / "ft", tmp_path / "unmerged", merge_lora=False)
    assert (tmp_path / "unmerged" / "adapter" / "adapter_model.safetensors").is_file()
    assert (outputs(attnswap.load(tmp_path / "unmerged"), ids) - ref).abs().max() <= 1e-5

    export(tmp_path / "ft", tmp_path / "bf16", dtype="bf16")
    loaded = attnswap.load(tmp_path / "bf16", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert (outputs(loaded, ids).float() - ref).abs().max() <= 0.1 * ref.abs().max()
    assert {p.name for p in (tmp_path / "bf16").iterdir()} >= {"config.json", "model.safetensors", "README.md",
                                                                "tokenizer.json", "metrics.json"}
    # no temporary directories left beside the exports
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_failure_leaves_nothing(tiny_dirs, tmp_path, monkeypatch):
    from attnswap.export import export

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("attnswap.export.write_model", boom)
    with pytest.raises(RuntimeError):
        export(tiny_dirs["llama"], tmp_path / "exp")
    assert list(tmp_path.iterdir()) == []


def test_every_command_is_a_recipe_step(tiny_dirs, tmp_path, capsys):
    """An inline plan (linear on layer 0, namm pruning the rest), evolve, eval memory, eval calibration,
    generate and export in one recipe: each step is its command's typed config."""
    recipe = {
        "model": str(tiny_dirs["llama"]),
        "convert": {"plan": {"attention": [{"layers": 0, "method": "linear", "options": {"window": 8}}],
                             "cache": {"policy": "namm", "budget": 0.5, "interval": 16}}},
        "evolve": {"data": str(WIKI_TEST), "generations": 1, "population": 2, "context": 96, "score_from": 48},
        "eval_memory": {"data": str(WIKI_TEST), "tasks": ["ppl"], "context": 96, "score_from": 48},
        "eval_calibration": {"data": str(WIKI_TEST), "max_tokens": 256, "seq_len": 64, "plot": "rel.png"},
        "generate": {"prompt": "The history of", "max_new_tokens": 6},
        "export": {"dtype": "fp32"},
    }
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["eval_memory"]["ppl"]["pruned_layers"] == 1 and r["eval_memory"]["ppl"]["kept_fraction"] == 0.5
    assert r["eval_calibration"]["tokens"] == 4 * 63 and (tmp_path / "run" / "rel.png").is_file()
    assert r["generate"]["new_tokens"] == 6
    best = attnswap.methods.kinds()["cache"].get("namm").load_params(tmp_path / "run" / "evolve" / "namm.safetensors")
    final = attnswap.load(tmp_path / "run" / "final")
    theta = [m.namm_params for m in attnswap.surgery.method_modules(final, "cache").values()]
    assert len(theta) == 1 and torch.equal(theta[0], best)  # the evolved vector travels to the export


def test_model_card_metadata_parses_with_huggingface_hub(tiny_dirs, tmp_path):
    """The hub's metadata block: base_model and license carried from the original through convert -> save ->
    export; library attnswap for a converted model, transformers for a plain one."""
    import shutil

    from huggingface_hub import ModelCard

    from attnswap.export import export
    from attnswap.models import origin

    src = tmp_path / "base"
    shutil.copytree(tiny_dirs["llama"], src)
    (src / "README.md").write_text("---\nbase_model: someone/tiny-llama\nlicense: mit\n---\n# tiny\n")
    model = attnswap.load_model(src)
    attnswap.convert(model, "sliding-window", window=8, sinks=1)
    attnswap.save(model, tmp_path / "conv", tokenizer=attnswap.load_tokenizer(src))
    export(tmp_path / "conv", tmp_path / "final")
    data = ModelCard.load(tmp_path / "final" / "README.md").data
    assert (data.base_model, data.license, data.library_name, data.pipeline_tag) == (
        "someone/tiny-llama", "mit", "attnswap", "text-generation")
    assert data.tags == ["attnswap", "attnswap-sliding-window"]
    card = (tmp_path / "final" / "README.md").read_text()
    assert "attnswap.load_model(path)" in card and "snapshot_download" in card

    export(src, tmp_path / "plain")  # unconverted: loads with transformers alone
    data = ModelCard.load(tmp_path / "plain" / "README.md").data
    assert (data.base_model, data.library_name, data.tags) == ("someone/tiny-llama", "transformers", ["attnswap"])
    assert "AutoModelForCausalLM.from_pretrained" in (tmp_path / "plain" / "README.md").read_text()
    # the offline model's GGUF states its license; the alias names its hub repository
    assert origin("smollm2-135m") == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0",
                                      "language": ["en"]}
