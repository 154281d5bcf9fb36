from ..errors import AttnswapError
from .base import ArchAdapter
from .registry import register_arch


@register_arch
class GPTNeoXAdapter(ArchAdapter):
    """GPT-NeoX / Pythia: RoPE on part of each head (`partial_rotary_factor`, applied before the attention
    function), q|k|v fused in `query_key_value` and interleaved per head ([head][q|k|v][dim] rows), output
    `dense`. The interleaving leaves no contiguous q, k or v block: tuners that fold into a projection's rows
    are refused (LoRA through PEFT adapts the fused module as a whole)."""

    name = "gpt_neox"
    model_types = ("gpt_neox",)
    causal = True
    positions = "rope"
    attention_path = r"layers\.(\d+)\.attention"
    lora_targets = ("query_key_value", "dense")

    def projection_modules(self, model, site):
        raise AttnswapError("gpt_neox interleaves q|k|v per head in one matrix: a tuner that adapts q, k or v rows "
                            "cannot be placed on it; use an attention method, or `finetune --lora-r` (PEFT)")
