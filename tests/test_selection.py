"""Layer selection by measurement (`layers: {auto: CRITERION, count: N}`): criteria against hand-computed
values, deterministic and stored, saved -> loaded -> exported with the same logits, one-line errors."""
import json

import pytest
import torch
import yaml

import attnswap
from attnswap.cli import main
from attnswap.data import calibration
from attnswap.methods.attention.selection import choose

from .conftest import WIKI_TRAIN, outputs, sample_ids
from .test_plans import four_layers  # noqa: F401  (fixture)

SW = {"method": "sliding-window", "options": {"window": 4, "sinks": 0}}


@pytest.fixture(scope="module")
def cal(tiny_tokenizer):
    return calibration(tiny_tokenizer, str(WIKI_TRAIN), tokens=96, seq_len=32, seed=0)


def _nll(model, ids):
    with torch.no_grad():
        return sum(float(model(input_ids=w, labels=w).loss) for w in ids.split(1)) / len(ids)


def _kl(model, original, ids):
    total = 0.0
    with torch.no_grad():
        for w in ids.split(1):
            p = torch.log_softmax(original(input_ids=w).logits.float(), -1)
            q = torch.log_softmax(model(input_ids=w).logits.float(), -1)
            total += float((p.exp() * (p - q)).sum(-1).mean())
    return total / len(ids)


def test_loss_and_kl_restore_scores_are_the_hand_computed_values(four_layers, cal):
    """loss: NLL with only layer l converted minus the original's; kl-restore: KL with all converted minus KL with
    all but l converted (computed here by converting those layers, a route that shares no code)."""
    from attnswap.methods.attention import REGISTRY
    from attnswap.methods.attention.selection import scores

    original = attnswap.load_model(four_layers)
    cls = REGISTRY.get("sliding-window")
    opts = cls.parse_options(SW["options"])
    loss = scores(original, cls, opts, [0, 1, 2, 3], cal, "loss", progress=False)
    kl = scores(original, cls, opts, [0, 1, 2, 3], cal, "kl-restore", progress=False)
    base = _nll(original, cal.ids)
    everything = attnswap.convert(attnswap.load_model(four_layers), "sliding-window", **SW["options"])
    kl_all = _kl(everything, original, cal.ids)
    for layer in (0, 2):
        one = attnswap.convert(attnswap.load_model(four_layers), "sliding-window", layers=[layer], **SW["options"])
        assert loss[layer] == pytest.approx(_nll(one, cal.ids) - base, abs=1e-5)
        rest = [x for x in range(4) if x != layer]
        others = attnswap.convert(attnswap.load_model(four_layers), "sliding-window", layers=rest, **SW["options"])
        assert kl[layer] == pytest.approx(kl_all - _kl(others, original, cal.ids), abs=1e-5)
    assert max(loss.values()) > 1e-4 and len(set(loss.values())) == 4


def test_kl_restore_after_a_brief_distillation_is_the_hand_computed_value(four_layers, cal):
    """distill_tokens: the scores are those of the all-converted model after attention transfer on the calibration
    windows (here: converted with the same seed, distilled by `distill.transfer`, each layer bypassed in turn);
    the original model's parameters keep their requires_grad flags."""
    from attnswap.distill import transfer
    from attnswap.methods.attention import REGISTRY
    from attnswap.methods.attention.selection import scores
    from attnswap.surgery import method_modules

    lin = {"feature_map": "hedgehog", "window": 4, "sinks": 1}
    original = attnswap.load_model(four_layers)
    cls = REGISTRY.get("linear")
    opts = cls.parse_options(lin)
    untrained = scores(original, cls, opts, [0, 1, 2, 3], cal, "kl-restore", progress=False)
    trained = scores(original, cls, opts, [0, 1, 2, 3], cal, "kl-restore", distill_tokens=96, progress=False)
    assert all(p.requires_grad for p in original.parameters())
    model = attnswap.convert(attnswap.load_model(four_layers), "linear", **lin)
    transfer(model, cal.ids, 3, 1e-2, progress=False)
    kl_all = _kl(model, original, cal.ids)
    methods = list(method_modules(model).values())
    for layer in range(4):
        methods[layer].bypass = True
        assert trained[layer] == pytest.approx(kl_all - _kl(model, original, cal.ids), abs=1e-5)
        methods[layer].bypass = False
    assert max(abs(trained[i] - untrained[i]) for i in range(4)) > 1e-4


def test_output_error_is_the_relative_error_of_the_layer_output(four_layers, cal):
    from attnswap.methods.attention import REGISTRY
    from attnswap.methods.attention.analysis import recording
    from attnswap.methods.attention.selection import scores

    model = attnswap.load_model(four_layers)
    cls = REGISTRY.get("sliding-window")
    got = scores(model, cls, cls.parse_options(SW["options"]), [1], cal, "output-error", progress=False)
    # by hand: the exact output against the band-masked softmax of the same q, k, v
    err = 0.0
    for w in cal.ids.split(1):
        with recording(model, inputs=True) as found, torch.no_grad():
            model(input_ids=w)
        exact, q, k, v = found[1][0]
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        t = q.shape[2]
        i, j = torch.arange(t)[:, None], torch.arange(t)[None]
        band = (j <= i) & (i - j < 4)
        a = torch.softmax((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~band, -torch.inf), -1)
        mine = (a @ v).transpose(1, 2).double()
        err += float((mine - exact.double()).pow(2).sum() / exact.double().pow(2).sum())
    assert got[1] == pytest.approx(err / len(cal.ids), rel=1e-4)


def test_evenly_keeps_evenly_spaced_layers_exact():
    assert choose(list(range(30)), 22, "evenly", None) == [x for x in range(30) if x not in {1, 5, 9, 13, 16, 20, 24, 28}]
    assert choose(list(range(4)), 4, "evenly", None) == [0, 1, 2, 3]
    assert choose([0, 1, 2, 3], 2, "loss", {0: 0.3, 1: 0.1, 2: 0.1, 3: 0.0}) == [1, 3]  # ties: lower index


def test_auto_layers_are_deterministic_stored_and_travel_with_the_checkpoint(four_layers, tiny_tokenizer, tmp_path,
                                                                           capsys):
    plan = tmp_path / "auto.yaml"
    plan.write_text(yaml.safe_dump({"attention": [{"layers": {"auto": "kl-restore", "count": 2}, **SW}],
                                    "cache": {"policy": "h2o", "budget": 0.5}}))
    cal_file = tmp_path / "cal.txt"
    cal_file.write_text(WIKI_TRAIN.read_text(encoding="utf-8")[:20_000])
    args = ["convert", str(four_layers), "--plan", str(plan), "--calibration", str(cal_file), "--calibration-tokens",
            "64", "--calibration-seq-len", "32", "--json"]
    results = []
    for out in ("a", "b"):
        assert main(args + ["--out", str(tmp_path / out)]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    a, b = results
    assert a["plan"] == b["plan"] and a["prepared"] == b["prepared"]
    sel = a["prepared"]["attention.0"]["selection"]
    assert sel["criterion"] == "kl-restore" and len(sel["converted"]) == 2 and set(sel["scores"]) == {"0", "1", "2", "3"}
    assert a["plan"]["attention"][0]["layers"] == sel["converted"]
    assert a["plan"]["cache"]["layers"] == [0, 1, 2, 3]  # sliding-window layers and exact ones: all read a KV cache
    loaded = attnswap.load(tmp_path / "a")
    ids = sample_ids(loaded.config.vocab_size, length=21)
    assert main(["export", str(tmp_path / "a"), "--out", str(tmp_path / "exp")]) == 0
    assert (outputs(attnswap.load(tmp_path / "exp"), ids) - outputs(loaded, ids)).abs().max() <= 1e-5
    capsys.readouterr()
    assert main(["list", str(tmp_path / "a")]) == 0
    assert "layers chosen by kl-restore" in capsys.readouterr().out


@pytest.mark.parametrize("layers, extra, message", [
    ({"auto": "loss", "count": 2}, [], "pass --calibration FILE"),
    ({"auto": "loss", "count": 9}, [], "cannot convert 9 of the 4 candidate layers"),
    ({"auto": "loss", "count": 2, "fraction": 0.5}, [], "exactly one of count and fraction"),
    ({"auto": "guess", "count": 2}, [], "bad plan at 'attention.0.layers"),
])
def test_bad_auto_layers_are_one_line_errors(four_layers, tmp_path, capsys, layers, extra, message):
    plan = tmp_path / "auto.yaml"
    plan.write_text(yaml.safe_dump({"attention": [{"layers": layers, **SW}]}))
    code = main(["convert", str(four_layers), "--plan", str(plan), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
