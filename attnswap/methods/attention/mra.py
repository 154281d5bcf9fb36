"""MRA: exact attention in the top-scoring blocks, block-mean approximation elsewhere, one softmax.

Zeng et al., "Multi Resolution Analysis (MRA) for Approximate Self-Attention", ICML 2022,
https://arxiv.org/abs/2207.10284; reference code mlpen/mra-attention (encoder-only, CUDA-only) and
transformers' `models/mra`. attnswap's version (see attnswap_kernels/mra/reference.py for the definition):
causal models use a block-causal form (diagonal block exact and masked, nothing above the diagonal),
bidirectional models the full grid; any length works (padding inside the op); a PyTorch reference runs on
CPU and a Triton kernel on CUDA, both differentiable, so `finetune` (LoRA on q/k/v/o) adapts the model to
the approximation. No new parameters: a budget covering every block is the original attention.
"""
from typing import Literal

from pydantic import Field, model_validator

from attnswap_kernels.mra import mra_attention

from .. import Options
from . import register
from .base import AttentionMethod, key_padding_keep


class MRAOptions(Options):
    block_size: int = Field(32, ge=1, description="tokens per block (the Triton kernel needs a power of 2 >= 16)")
    block_budget: float = Field(
        0.5, gt=0, description="exact blocks: <= 1 a fraction of the allowed block pairs, > 1 blocks per query-block row")
    approx_mode: Literal["full", "sparse"] = Field(
        "full", description="full: non-selected blocks from block means (log-sum-exp merge); sparse: selected only")
    selection: Literal["global", "row"] = Field(
        "global", description="spend the budget over each head's whole block grid, or evenly in every query-block row")
    shared_selection: bool = Field(
        True, description="grouped-query models: one block selection per KV head, shared by its query heads")
    diagonal_blocks: int = Field(1, ge=0, description="band of diagonal blocks always exact (causal: at least 1)")
    first_blocks: int = Field(1, ge=0, description="first key blocks always exact (global tokens, attention sinks)")

    @model_validator(mode="after")
    def _count_is_integer(self):
        if self.block_budget > 1 and self.block_budget != int(self.block_budget):
            raise ValueError("a block_budget above 1 is a count of blocks per row and must be a whole number")
        return self


@register
class MRA(AttentionMethod):
    name = "mra"
    uses_mask = False
    summary = "multi-resolution attention: exact top-k blocks + block-mean approximation (MRA), Triton kernel"
    Options = MRAOptions
    adds = "no new parameters (a block-sparse kernel); adapt with finetune"

    def forward(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        o = self.options
        out = mra_attention(
            query, key, value, causal=self.causal, block_size=o.block_size, budget=o.block_budget,
            approx=o.approx_mode, selection=o.selection, diagonal_blocks=o.diagonal_blocks,
            first_blocks=o.first_blocks, shared_selection=o.shared_selection,
            key_valid=key_padding_keep(attention_mask), scale=scaling,
        )
        return out.transpose(1, 2), None
