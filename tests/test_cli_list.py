import json

from attnswap.cli import main
from attnswap.methods import kinds


def test_list_shows_every_registered_method_of_every_kind(capsys):
    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for kind, registry in kinds().items():
        rows = {r["name"]: r for r in listed[kind]}
        assert set(rows) == set(registry.all()), kind
        for name, row in rows.items():
            assert row["architectures"] and row["directions"], name
            assert set(row["options"]) == set(registry.get(name).Options.model_fields), name
    attention = {r["name"]: r for r in listed["attention"]}
    assert attention["sliding-window"]["trainable_params_per_layer_smollm2"] == 0
    # Hedgehog maps for 9 query + 3 key heads of 64 x 64, and 9 mix factors
    assert attention["linear"]["trainable_params_per_layer_smollm2"] == 12 * 64 * 64 + 9
    assert attention["linear"]["options"]["window"]["default"] == 64
    assert attention["linear"]["prunable"] is False and attention["mra"]["prunable"] is True
    # bitfit: a bias on q (576), k (192), v (192), o (576) at SmolLM2's shapes
    assert {r["name"]: r for r in listed["tuner"]}["bitfit"]["trainable_params_per_layer_smollm2"] == 1536
    assert [r["name"] for r in listed["cache"] if r["evolvable"]] == ["namm"]
    # lln: alpha per head (9), beta per KV head (3), a mix factor per head (9)
    assert attention["lln"]["trainable_params_per_layer_smollm2"] == 21
    # gmm-mask: an amplitude and a width per Gaussian (3) per head (9)
    assert {r["name"]: r for r in listed["scores"]}["gmm-mask"]["trainable_params_per_layer_smollm2"] == 54
