import json

from attnswap.cli import main
from attnswap.variants.registry import all_variants


def test_list_shows_every_registered_variant(capsys):
    assert main(["list", "--json"]) == 0
    listed = {r["variant"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["variants"]}
    assert set(listed) == set(all_variants())
    for name, row in listed.items():
        assert row["architectures"] and row["directions"] and row["options"], name
    assert listed["sliding-window"]["trainable_params_per_layer_smollm2"] == 0
    # Hedgehog maps for 9 query + 3 key heads of 64 x 64, and 9 mix factors
    assert listed["linear"]["trainable_params_per_layer_smollm2"] == 12 * 64 * 64 + 9
    assert listed["linear"]["options"]["window"]["default"] == 64
