"""namm: Neural Attention Memory Models (Cetin et al., "An Evolved Universal Transformer Memory", 2024,
arXiv 2410.13166; SakanaAI/evo-memory): a tiny network scores each entry from the spectrogram of the attention
it receives and its age (`model.py`); its 506 parameters are searched by CMA-ES (`attnswap evolve`) and ride
in the model as a buffer of each layer's policy."""
from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from ....errors import AttnswapError
from ... import Prepared
from .. import register
from ..base import CacheOptions, CachePolicy, protect_recent
from .model import EMA, N_FFT, N_PARAMS, default_params, network, recency, spectrogram, standardise


class NAMMOptions(CacheOptions):
    budget: float | None = Field(0.5, gt=0, le=1, description="fraction of the tokens seen that each layer and KV "
                                                              "head keeps (null: namm decides, score <= 0 evicts)")
    params: str | None = Field(None, description="evolved parameters file (attnswap evolve), copied into the model; "
                                                 "default: the built-in starting vector")


@register
class NAMM(CachePolicy):
    name = "namm"
    summary = "a 506-parameter network on attention spectrograms + recency, evolved by CMA-ES (NAMM)"
    Options = NAMMOptions
    rows = True
    free_budget = True
    evolvable = "namm_params"
    adds = "no trainable parameters; the scorer's 506 parameters (evolved) ride along as a buffer"

    def __init__(self, options, site, geometry, adapter):
        super().__init__(options, site, geometry, adapter)
        self.register_buffer("namm_params", default_params())

    @classmethod
    def initial_params(cls) -> torch.Tensor:
        return default_params()

    @classmethod
    def load_params(cls, path: str | Path) -> torch.Tensor:
        """The parameter vector from a file written by `attnswap evolve` (safetensors, key 'namm')."""
        from safetensors.torch import load_file

        p = Path(path)
        if not p.is_file():
            raise AttnswapError(f"namm parameters not found: {path} (write them with 'attnswap evolve')")
        try:
            theta = load_file(str(p))[cls.name]
        except Exception:  # noqa: BLE001
            raise AttnswapError(f"{path} is not a namm parameters file (safetensors with a 'namm' tensor)") from None
        if theta.shape != (N_PARAMS,):
            raise AttnswapError(f"{path}: expected {N_PARAMS} namm parameters, found {tuple(theta.shape)}")
        return theta.float()

    @classmethod
    def prepare(cls, model, options, layers, calibration=None):
        """Read an evolved parameters file once: the vector becomes the buffer saved with the model, so the
        stored options carry no path and a saved model loads without the file."""
        if not options.params:
            return Prepared(options)
        theta = cls.load_params(options.params)
        return Prepared(options.model_copy(update={"params": None}), {"params_file": options.params},
                        {"namm_params": theta})

    @classmethod
    def describe(cls, entry, prepared):
        if prepared.get("params_file"):
            return [f"namm parameters from {prepared['params_file']} (saved in the model)"]
        return []

    def score(self, layer, rows):
        mags = spectrogram(rows.float())  # [B, Hkv, F, N, 17]
        ema = layer.stats.get("namm")
        ema = torch.zeros_like(mags[:, :, 0]) if ema is None else ema
        for f in range(mags.shape[2]):
            ema = EMA * ema + (1 - EMA) * mags[:, :, f]
        layer.stats["namm"] = ema
        age = (layer.seen - layer.pos).clamp_min(0)
        x = torch.cat([torch.log(ema + 1e-8), recency(age)], dim=-1)
        x = standardise(x, layer.valid)
        score = network(self.namm_params, x, layer.pos, layer.valid)
        return protect_recent(score, layer, N_FFT - 1)  # ages 1..31: no full STFT frame yet, kept
