"""bitfit: a trainable bias per target projection, zero at conversion (the template tuner)."""
import pytest
import torch

import attnswap
from attnswap.surgery import method_modules

from .conftest import WIKI_TRAIN, outputs, sample_ids


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_bitfit_starts_exact_and_finetune_trains_only_the_tuner(tiny_dirs, tiny_tokenizer, tmp_path, name):
    model = attnswap.load_model(tiny_dirs[name])
    ids = sample_ids(model.config.vocab_size, length=19)
    ref = outputs(model, ids)
    attnswap.convert(model, {"attention": [{"layers": 1, "method": "sliding-window", "options": {"window": 64}}],
                             "tuner": {"method": "bitfit", "options": {"targets": ["v", "o"]}}})
    assert (outputs(model, ids) - ref).abs().max() <= 1e-5
    if name == "bert":
        return
    from attnswap.config import FinetuneConfig
    from attnswap.train import finetune

    cfg = FinetuneConfig(data=str(WIKI_TRAIN), steps=3, seq_len=32, lr=1e-2, warmup=0)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "attnswap" not in k}
    finetune(model, tiny_tokenizer, cfg, tmp_path / "ft", progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())  # no LoRA, the backbone frozen
    biases = [p for t in method_modules(model, "tuner").values() for p in t.bias.values()]
    assert len(biases) == 4 and all(b.abs().max() > 0 for b in biases)
    again = attnswap.load(tmp_path / "ft")
    assert not (tmp_path / "ft" / "adapter").exists()
    assert (outputs(again, ids) - outputs(model, ids)).abs().max() <= 1e-5
