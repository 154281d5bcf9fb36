"""none: the original attention computed through attnswap (the template attention method)."""
import pytest

import attnswap

from .conftest import outputs, sample_ids


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_none_is_the_original_attention(tiny_dirs, name):
    model = attnswap.load_model(tiny_dirs[name])
    ids = sample_ids(model.config.vocab_size, length=23)
    ref = outputs(model, ids)
    attnswap.convert(model, "none")
    assert (outputs(model, ids) - ref).abs().max() <= 1e-6
