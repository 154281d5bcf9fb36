from .base import ArchAdapter
from .registry import register_arch


@register_arch
class LlamaAdapter(ArchAdapter):
    """Llama family: RoPE applied to q/k before the attention function, GQA, separate q/k/v/o under
    `layers.N.self_attn`. The same layout serves Gemma 1-3 (their `query_pre_attn_scalar` arrives as the
    attention function's `scaling`, Gemma 2's logit soft-capping as `softcap`, their local layers' windows in the
    mask), OLMo 2 and Qwen3 (q/k norms before RoPE: the method sees the normed q/k) and Granite (its
    `attention_multiplier` is the `scaling`)."""

    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "granite")
    causal = True
    positions = "rope"
    attention_path = r"layers\.(\d+)\.self_attn"
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")

    def projection_modules(self, model, site):
        return {n: (getattr(site.module, f"{n}_proj"), slice(None)) for n in "qkvo"}
