"""One softmax attention call over a key set with an additive bias, returning (o, lse), and its backward given
the merged output and log-sum-exp: PyTorch's fused CPU flash kernels, plain math on other devices. Shared by
the block-sparse CPU paths (MRA, sparse), which split a row's keys into parts and merge them by log-sum-exp."""
import torch

NEG = -1e30  # a masked key's bias: exp underflows to exactly 0, and a row with no key stays finite


def _causal_bias(q, k):
    tq, tk = q.shape[-2], k.shape[-2]
    ok = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()  # the kernel's causal flag: top-left aligned
    return torch.where(ok, 0.0, NEG).to(q.dtype)


def flash(q, k, v, mask, scale, causal: bool = False):
    """(o, lse) of softmax(q k^T * scale + mask) v (mask None: none; causal: key j <= query i by index): PyTorch's
    fused CPU kernel, or plain math elsewhere."""
    if q.is_cpu:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                          scale=scale)
    mask = (0.0 if mask is None else mask) + (_causal_bias(q, k) if causal else 0.0)
    s = q @ k.transpose(-1, -2) * scale + mask
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]) @ v, lse


def flash_bwd(do, q, k, v, o, lse, mask, scale, causal: bool = False):
    """Gradients of one key part given the merged output o and log-sum-exp (split-KV backward)."""
    if q.is_cpu:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, causal, attn_mask=mask, scale=scale)
    mask = (0.0 if mask is None else mask) + (_causal_bias(q, k) if causal else 0.0)
    p = torch.exp(q @ k.transpose(-1, -2) * scale + mask - lse[..., None])
    ds = p * (do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    return ds @ k * scale, ds.transpose(-1, -2) @ q * scale, p.transpose(-1, -2) @ do
