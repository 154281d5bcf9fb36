"""Typed configs for every step. The CLI and YAML recipes both go through these, so option help and
validation are written once, on the fields. Override order: defaults, then the recipe, then CLI flags."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Config(BaseModel):
    # inf / nan are refused at the edge: `--lr inf` is a one-line error, not a run of non-finite weights
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ConvertConfig(_Config):
    variant: str = Field(description="variant name (see 'attnswap list')")
    options: dict[str, Any] = Field(default_factory=dict, description="variant options, key: value")
    layers: str | list[int] | None = Field(None, description="layers to convert, e.g. '0-5,10' (default: all)")
    calibration: str | None = Field(None, description="text on which variants that measure the model first "
                                                      "(dex head selection) measure it")
    calibration_tokens: int = Field(4096, ge=2, description="calibration tokens, drawn as windows from the text")
    calibration_seq_len: int = Field(512, ge=2, description="calibration window length")
    seed: int = Field(0, description="seed for drawing the calibration windows")

    def calibration_for(self, tokenizer):
        """The calibration windows (None without calibration text)."""
        from .data import calibration

        if self.calibration is None:
            return None
        return calibration(tokenizer, self.calibration, self.calibration_tokens, self.calibration_seq_len, self.seed)


class DistillConfig(_Config):
    data: str = Field(description="training text: a UTF-8 file, or 'wikitext-train' through datasets")
    tokens: int = Field(gt=0, description="training tokens in all (steps = tokens / (batch_size x seq_len))")
    seq_len: int = Field(1024, ge=2, description="tokens per training sequence")
    batch_size: int = Field(1, ge=1, description="sequences per step")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate of the variant's new parameters")
    seed: int = Field(0, description="seed for the data order")
    allow_long: bool = Field(False, description="allow --seq-len beyond the model's maximum positions (rotary "
                                                "models only)")

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))


class FinetuneConfig(_Config):
    data: str = Field(description="training text: a UTF-8 file, or 'wikitext-train' through datasets")
    steps: int = Field(gt=0, description="optimizer steps")
    lora_r: int = Field(8, ge=0, description="LoRA rank on q/k/v/o (0: train only the variant's own parameters)")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / r)")
    lr: float = Field(2e-4, gt=0, description="peak learning rate (AdamW)")
    variant_lr: float | None = Field(None, gt=0, description="peak learning rate of the variant's own parameters "
                                                             "(default: lr)")
    warmup: int = Field(10, ge=0, description="linear warm-up steps, then linear decay to 0")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    seq_len: int = Field(512, ge=2, description="tokens per training sequence")
    batch_size: int = Field(1, ge=1, description="sequences per step per process")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    save_every: int = Field(50, ge=1, description="write a resumable checkpoint every N steps")
    seed: int = Field(0, description="seed for LoRA init and data order")
    allow_long: bool = Field(False, description="allow --seq-len beyond the model's maximum positions (rotary "
                                                "models only)")


class EvalConfig(_Config):
    data: str = Field(description="evaluation text: a UTF-8 file, or 'wikitext' through datasets")
    max_tokens: int | None = Field(16384, gt=1, description="use the first N tokens of the text")
    seq_len: int = Field(1024, ge=2, description="window length; each window is scored on its own")
    batch_size: int = Field(1, ge=1, description="windows per forward pass")
    compare: bool = Field(True, description="also evaluate the original model and report the ratio")
    allow_long: bool = Field(False, description="allow --seq-len beyond the model's maximum positions (rotary "
                                                "models only; for speed measurements, not meaningful outputs)")

    @model_validator(mode="after")
    def _one_window(self):
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise ValueError(f"max_tokens {self.max_tokens} is shorter than one window of seq_len {self.seq_len}")
        return self


class ExportConfig(_Config):
    merge_lora: bool = Field(True, description="merge LoRA into the weights (else keep adapter/ beside them)")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="weight dtype of the export")


class Recipe(_Config):
    """convert -> distill -> finetune -> eval -> export, from one YAML file (recipes/*.yaml)."""

    model: str = Field(description="model source: alias, directory, .gguf file or hub id")
    convert: ConvertConfig
    distill: DistillConfig | None = None
    finetune: FinetuneConfig | None = None
    eval: EvalConfig | None = None
    export: ExportConfig | None = Field(default_factory=ExportConfig)
    out: str | None = Field(None, description="run directory (the CLI's --out overrides it)")


def field_help(model: type[BaseModel], name: str) -> str:
    return model.model_fields[name].description or ""
