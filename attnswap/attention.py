"""The "attnswap" attention implementation registered with transformers.

Every attention module of a converted model calls `attnswap_attention`. What runs is read from the module
itself and from one explicit argument:
- the module's attention method (its `attnswap` submodule), else plain SDPA (the original attention);
- the module's score modifier (its `attnswap_scores` submodule), handed to that attention as the keyword
  argument `attnswap_score_modifier`;
- the layer's cache layer, when it is one of attnswap's (a method's own decoding state, or a cache policy's
  pruned cache): a forward pre-hook on the attention module (`cache_hook`) takes it from the cache object by
  layer index and passes it as the keyword argument `attnswap_cache_layer`, which transformers forwards to the
  attention function; that layer's `attend` then computes the attention (with the method, if any).
Probes (recording and head masking, attnswap.methods.attention.analysis) are attached to a module for the
duration of a block. Registration happens when a model is converted or loaded, never on `import attnswap`.
"""
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "attnswap"
# the keyword argument that carries a layer's attnswap cache layer into the attention function
CACHE_LAYER = "attnswap_cache_layer"
# the keyword argument that carries a layer's score modifier (its `attnswap_scores` submodule) to the attention
SCORE_MODIFIER = "attnswap_score_modifier"
# the attribute of an attention module that holds the probes attached to it for a while: each probe is called
# as probe(module, out, query, key, value) -> out
PROBES = "attnswap_probes"
# the attribute of an attention module whose queries and keys are defined by their first r dimensions (a tuner that
# reduces the q/k head size sets it): the scores are computed in r dimensions, at the original scale
QK_DIM = "attnswap_qk_dim"


def exact_attention(module, query, key, value, attention_mask, **kwargs):
    """The original softmax attention: SDPA, or in plain PyTorch where the logits are soft-capped (Gemma 2's
    `softcap`, which SDPA cannot apply) or changed by the layer's score modifier (keyword `SCORE_MODIFIER`,
    applied after the cap, before the mask). The mask is SDPA's: boolean [B, 1, Tq, Tk] (True = attend), or
    None with causality from the module."""
    softcap = kwargs.pop("softcap", None)
    modifier = kwargs.pop(SCORE_MODIFIER, None)
    if softcap is None and modifier is None:
        if query.shape[-1] < value.shape[-1]:  # q/k in a reduced head size (QK_DIM)
            return reduced_attention(module, query, key, value, attention_mask, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    import torch

    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    logits = torch.matmul(query, k.transpose(2, 3)) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    tq, tk = query.shape[2], key.shape[2]
    if modifier is not None:  # queries are the last tq of the tk keys
        pos = torch.arange(tk, device=query.device)
        logits = modifier.modify(logits, pos[tk - tq:], pos)
    if attention_mask is not None:
        mask = attention_mask[..., :tk]
        if mask.dtype != torch.bool:
            logits = logits + mask
            mask = None
    elif is_causal and tq > 1:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(tk - tq)
    else:
        mask = None
    if mask is not None:
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    weights = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(query.dtype)
    return torch.matmul(weights, v).transpose(1, 2).contiguous(), None


def compiled_causal(query, key, attention_mask, kwargs: dict) -> bool:
    """True where the compiled CPU attention kernels (`attnswap_kernels.sparse_attn`) compute what causal SDPA
    would: a full forward (Tq = Tk) of float32/64 CPU tensors with no padding mask and no dropout, the library
    built. Causality itself is the caller's to check."""
    import torch

    from attnswap_kernels.sparse_attn import cpu as sparse_cpu

    return (attention_mask is None and query.shape[2] == key.shape[2] and query.device.type == "cpu"
            and query.dtype in (torch.float32, torch.float64) and not kwargs.get("dropout") and sparse_cpu.available())


def reduced_attention(module, query, key, value, attention_mask, **kwargs):
    """Softmax attention whose q/k head size is below v's. A causal full forward of float32/64 CPU tensors with
    no padding mask and no dropout runs the compiled kernel in the reduced size (`window_attention` with the
    window the whole sequence: exact causal attention); everything else runs SDPA on q and k padded with zeros to
    v's size, the same scores (PyTorch's CPU SDPA has no fused path for unequal sizes: its math path is slower
    than the padded flash path)."""
    from torch.nn.functional import pad

    from attnswap_kernels.sparse_attn import window_attention

    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    kwargs["scaling"] = kwargs.get("scaling") or query.shape[-1] ** -0.5
    if is_causal and compiled_causal(query, key, attention_mask, kwargs):
        out = window_attention(query, key, value, window=query.shape[2], scale=kwargs["scaling"])
        return out.transpose(1, 2), None
    width = (0, value.shape[-1] - query.shape[-1])
    return sdpa_attention_forward(module, pad(query, width), pad(key, width), value, attention_mask, **kwargs)


def attention_weights(query, key, scale: float, mask=None):
    """[B, H, Tq, Tk] float64: softmax(q k^T x scale) over the keys `mask` allows (boolean, broadcastable,
    True = attend; None: every key), each key head shared by its group of query heads. For measurements
    (`attnswap inspect`), not for the forward pass."""
    import torch

    k = key.repeat_interleave(query.shape[1] // key.shape[1], 1)
    logits = (query.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, -1)


def attnswap_attention(module, query, key, value, attention_mask, **kwargs):
    layer = kwargs.pop(CACHE_LAYER, None)
    method = getattr(module, "attnswap", None)
    if method is not None and method.bypass:
        method = None  # the original attention, without the layer's score modifier: the teacher of distill
    else:
        modifier = getattr(module, "attnswap_scores", None)
        if modifier is not None:  # the plan allows it only beside attention that forms scores (takes_scores)
            kwargs[SCORE_MODIFIER] = modifier
    qk = getattr(module, QK_DIM, None)
    if qk is not None and qk < query.shape[-1]:
        query, key, kwargs = reduced_qk(query, key, qk, kwargs, narrow=method is None and layer is None)
    if layer is not None:
        out = layer.attend(module, query, key, value, attention_mask, method=method, **kwargs)
    elif method is not None:
        out = method(module, query, key, value, attention_mask, **kwargs)
    else:
        out = exact_attention(module, query, key, value, attention_mask, **kwargs)
    for probe in getattr(module, PROBES, ()):
        out = probe(module, out, query, key, value)
    return out


def reduced_qk(query, key, qk: int, kwargs: dict, narrow: bool):
    """q and k of a layer defined by their first `qk` dimensions, at the original scale (kwargs' `scaling`, else
    1/sqrt of the full head size). narrow: cut to those dimensions (exact attention computes in the reduced size);
    else zero the rest, the same scores for any attention method or cache layer that expects the full size."""
    kwargs = {**kwargs, "scaling": kwargs.get("scaling") or query.shape[-1] ** -0.5}
    if narrow:
        return query[..., :qk], key[..., :qk], kwargs
    from torch.nn.functional import pad

    return pad(query[..., :qk], (0, query.shape[-1] - qk)), pad(key[..., :qk], (0, key.shape[-1] - qk)), kwargs


def cache_hook(index: int):
    """A forward pre-hook for the attention module of layer `index`: when the call carries a cache whose layer
    there is attnswap's (it has `attend`), pass that layer to the attention function."""

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # the name since transformers 5.2x, and before
        layers = getattr(cache, "layers", None)
        i = getattr(module, "layer_idx", None)
        i = index if i is None else i  # the index the module itself updates the cache with
        if layers is None or i >= len(layers) or not hasattr(layers[i], "attend"):
            return None
        return args, {**kwargs, CACHE_LAYER: layers[i]}

    return hook


def ensure_registered() -> str:
    # The mask function must be registered too, or transformers builds no mask and causality is lost.
    # SDPA's mask: None where `is_causal` can be used, else a boolean [B, 1, Tq, Tk] (True = attend).
    AttentionInterface.register(IMPLEMENTATION, attnswap_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    return IMPLEMENTATION
