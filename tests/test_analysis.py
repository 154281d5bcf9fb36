"""Head measurements: recording per-head outputs on plain and converted models, head redundancy."""
import torch

import attnswap
from attnswap.methods.attention.analysis import head_redundancy, recording

from .conftest import outputs, sample_ids


def test_recording_collects_every_layer_without_changing_the_model(tiny_dirs):
    for name in ("llama", "gpt2", "bert"):
        model = attnswap.load_model(tiny_dirs[name])
        ids = sample_ids(model.config.vocab_size, length=21)
        ref = outputs(model, ids)
        impl = model.config._attn_implementation
        with recording(model) as heads:
            got = outputs(model, ids)
        assert torch.equal(got, ref) or (got - ref).abs().max() <= 1e-6
        assert model.config._attn_implementation == impl
        assert sorted(heads) == [0, 1] and heads[0][0].shape == (2, 21, 4, 8)
        assert outputs(model, ids).shape == ref.shape  # recording stopped: nothing appended after the block
        assert len(heads[0]) == 1


def test_head_redundancy_values():
    x = torch.randn(2, 5, 1, 8)
    out = torch.cat([x, x, -x, torch.zeros_like(x) + torch.randn(2, 5, 1, 8)], dim=2)
    r = head_redundancy(out[:, :, :3])
    assert torch.allclose(r, torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64), atol=1e-12)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 3:] = False
    assert torch.allclose(head_redundancy(out[:, :, :3], keep), r, atol=1e-12)


def test_recording_sees_a_variant_output(tiny_dirs):
    """On a converted model the recorded heads are the variant's output (dex with lambda on: heads change)."""
    model = attnswap.load_model(tiny_dirs["llama"])
    ids = sample_ids(model.config.vocab_size, length=15)
    with recording(model) as before:
        outputs(model, ids)
    attnswap.convert(model, "dex", heads=[2], keep_norm=False)
    for v in attnswap.surgery.method_modules(model).values():
        v.ramp.fill_(1.0)
    with recording(model) as after:
        outputs(model, ids)
    assert model.config._attn_implementation == "attnswap"
    a, b = before[0][0], after[0][0]
    assert (a[:, :, [0, 1, 3]] - b[:, :, [0, 1, 3]]).abs().max() <= 1e-6
    assert torch.allclose(b[:, :, 2], a[:, :, 2] * 0.5, atol=1e-5)  # W = I, lambda 0.5: O (1 - 0.5)


def test_masking_and_recording_nest_in_either_order_and_leave_nothing_behind(tiny_dirs):
    """Probes live on the attention modules only inside their blocks; a masked head records as zero whether
    the recording block is outside or inside the masking block (scaling runs first)."""
    from attnswap import attention
    from attnswap.methods.attention.analysis import heads_scaled

    model = attnswap.load_model(tiny_dirs["llama"])
    ids = sample_ids(model.config.vocab_size, length=15)
    mask = {1: torch.tensor([1.0, 0.0, 1.0, 1.0])}
    with recording(model) as outer:
        with heads_scaled(model, mask):
            masked = outputs(model, ids)
    with heads_scaled(model, mask):
        with recording(model) as inner:
            outputs(model, ids)
    for rec in (outer, inner):
        assert rec[1][0][:, :, 1].abs().max() == 0 and rec[1][0][:, :, 0].abs().max() > 0
        assert rec[0][0][:, :, 1].abs().max() > 0  # layer 0 is not masked
    assert (inner[1][0] - outer[1][0]).abs().max() <= 1e-6
    assert (masked - outputs(model, ids)).abs().max() > 1e-4  # masking ended with its block
    assert not any(hasattr(m, attention.PROBES) for m in model.modules())
