"""Typed configs, one per command. The CLI's options are generated from them (`attnswap.cli.from_config`) and
recipe steps are the same models, so defaults, help and validation are written once, on the fields.
Override order: defaults, then the recipe, then CLI flags. A field marked `path=True` is a file or folder
(`~` expands; in a recipe it is relative to the recipe's folder); `cli=False` fields are not CLI options."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

PATH = {"path": True}
NO_CLI = {"cli": False}


class _Config(BaseModel):
    # inf / nan are refused at the edge: `--lr inf` is a one-line error, not a run of non-finite weights
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


class _Lengths(_Config):
    allow_long: bool = Field(False, description="allow lengths beyond the model's maximum positions (rotary models "
                                                "only; for speed measurements, outputs past them are not meaningful)")


class ConvertConfig(_Config):
    to: str | None = Field(None, validation_alias=AliasChoices("to", "method", "variant"),
                           description="one method (see 'attnswap list'): the shorthand of a one-entry plan")
    plan: str | dict | None = Field(None, description="plan YAML file (per-layer attention methods, a cache policy, "
                                                      "a tuner; see docs/architecture.md); in a recipe also inline",
                                    json_schema_extra=PATH)
    options: dict[str, Any] = Field(default_factory=dict, description="options of --to, key: value",
                                    json_schema_extra=NO_CLI)
    layers: str | list[int] | None = Field(None, description="layers --to converts, e.g. '0-5,10' (default: all)")
    calibration: str | None = Field(None, description="text on which methods that measure the model first (dex head "
                                                      "selection) measure it", json_schema_extra=PATH)
    calibration_tokens: int = Field(4096, ge=2, description="calibration tokens, drawn as windows from the text")
    calibration_seq_len: int = Field(512, ge=2, description="calibration window length")
    seed: int = Field(0, description="seed for drawing the calibration windows, the layer selection and the new parameters' initialisation (with --to, also the method's own `seed` option unless --set gives it)")

    @model_validator(mode="after")
    def _one_way(self):
        if (self.to is None) == (self.plan is None):
            raise ValueError("give exactly one of --to METHOD and --plan FILE")
        if self.plan is not None and (self.options or self.layers is not None):
            raise ValueError("options and layers belong inside the plan when --plan is given")
        return self

    def spec(self) -> dict:
        """The plan this asks for, as a dict."""
        from . import plan

        if self.plan is None:
            return plan.shorthand(self.to, self.options, self.layers, seed=self.seed)
        return plan.read(self.plan) if isinstance(self.plan, str) else self.plan

    def calibration_for(self, tokenizer):
        """The calibration windows (None without calibration text)."""
        from .data import calibration

        if self.calibration is None:
            return None
        return calibration(tokenizer, self.calibration, self.calibration_tokens, self.calibration_seq_len, self.seed)


Parallel = Literal["ddp", "fsdp"]
PARALLEL_HELP = ("under torchrun: ddp (every process holds the whole model; gradients averaged) or fsdp (parameters, "
                 "gradients and optimizer state sharded over the processes per decoder layer and per attention "
                 "module, torch's FSDP2 fully_shard; gloo on CPU); one process: no difference")


class DistillConfig(_Lengths):
    data: str = Field(description="training text: a UTF-8 file, or 'wikitext-train' through datasets",
                      json_schema_extra=PATH)
    tokens: int = Field(gt=0, description="training tokens in all (steps = tokens / (batch_size x seq_len))")
    seq_len: int = Field(1024, ge=2, description="tokens per training sequence")
    batch_size: int = Field(1, ge=1, description="sequences per step per process")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate of the attention methods' new parameters")
    seed: int = Field(0, description="seed for the data order")
    parallel: Parallel = Field("ddp", description=PARALLEL_HELP)

    @property
    def steps(self) -> int:
        return self.steps_over(1)

    def steps_over(self, processes: int) -> int:
        """Optimizer steps when `processes` processes each take `batch_size` sequences per step."""
        return max(1, self.tokens // (self.batch_size * self.seq_len * processes))


class FinetuneConfig(_Lengths):
    data: str = Field(description="training text: a UTF-8 file, or 'wikitext-train' through datasets (with --task "
                                  "classification: a JSON Lines file of labelled examples)",
                      json_schema_extra=PATH)
    steps: int = Field(gt=0, description="optimizer steps")
    lora_r: int = Field(8, ge=0, description="LoRA rank on q/k/v/o (0: train only the plan's own parameters; a plan "
                                             "with a tuner trains the tuner instead)")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / r)")
    lr: float = Field(2e-4, gt=0, description="peak learning rate (AdamW)")
    variant_lr: float | None = Field(None, gt=0, description="peak learning rate of the plan's own parameters "
                                                             "(attention methods, tuner; default: lr)")
    warmup: int = Field(10, ge=0, description="linear warm-up steps from 0, then linear decay to 0 (transformers' "
                                              "linear schedule)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    seq_len: int = Field(512, ge=2, description="tokens per training sequence")
    batch_size: int = Field(1, ge=1, description="sequences per step per process")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    save_every: int = Field(50, ge=1, description="write a resumable checkpoint every N steps")
    seed: int = Field(0, description="seed for the PEFT LoRA initialisation and a new classification head (a plan's "
                                      "tuner is initialised by convert: its --seed); the data is read in order from "
                                      "the start")
    parallel: Parallel = Field("ddp", description=PARALLEL_HELP)
    task: Literal["lm", "classification"] = Field(
        "lm", description="lm: next-token prediction on a text file; classification: a sequence-classification head "
                          "(new, or the checkpoint's) trained with LoRA on a JSON Lines file of {\"text\", "
                          "\"label\"[, \"text_pair\"]} examples, read in order and repeated (epochs = steps x "
                          "batch-size / examples); --seq-len truncates each example")
    loss: Literal["ce", "kl"] = Field("ce", description="ce: next-token cross-entropy on the text; kl: KL divergence "
                                                      "from the original model's next-token distribution (the teacher "
                                                      "is the same model with its attention methods bypassed and the "
                                                      "LoRA off: no second copy)")

    @model_validator(mode="after")
    def _classification_loss(self):
        if self.task == "classification" and self.loss == "kl":
            raise ValueError("--loss kl distils next-token distributions; a classifier trains with --loss ce")
        return self


class _Text(_Lengths):
    data: str = Field(description="evaluation text: a UTF-8 file, or 'wikitext' through datasets",
                      json_schema_extra=PATH)
    max_tokens: int | None = Field(16384, gt=1, description="use the first N tokens of the text (null in a recipe "
                                                            "or the API: all)")
    seq_len: int = Field(1024, ge=2, description="window length; each window is scored on its own")

    @model_validator(mode="after")
    def _one_window(self):
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise ValueError(f"max_tokens {self.max_tokens} is shorter than one window of seq_len {self.seq_len}")
        return self


class EvalConfig(_Text):
    batch_size: int = Field(1, ge=1, description="windows per forward pass")
    compare: str | bool | None = Field(None, description="also evaluate this original model and report the ratio "
                                                         "(in a recipe, true: the recipe's model)",
                                       json_schema_extra=PATH)


class CalibrationConfig(_Text):
    plot: str | None = Field(None, description="write the reliability diagram to this PNG file",
                             json_schema_extra=PATH)
    ensemble: list[str] | None = Field(None, description="also these models, comma-separated: SOURCE and they are "
                                                         "scored as one explicit ensemble (the mean of all their "
                                                         "members' probabilities); same vocabulary or classes")

    @model_validator(mode="after")
    def _png(self):
        if self.plot is not None and not self.plot.endswith(".png"):
            raise ValueError(f"plot '{self.plot}': give a .png file name")
        return self


class LmEvalConfig(_Config):
    tasks: str = Field(description="lm-eval task names, comma-separated (offline: attnswap_wikitext_nextsent)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per item (default: the task's)")
    limit: int | None = Field(None, ge=1, description="first N items of each task")
    include_path: str | None = Field(None, description="a folder of your own lm-eval task YAMLs",
                                     json_schema_extra=PATH)
    batch_size: int = Field(1, ge=1, description="requests per forward pass")
    compare: str | None = Field(None, description="also evaluate this original model beside it",
                                json_schema_extra=PATH)

    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]


class RetrievalConfig(_Config):
    data: str = Field(description="text to cut into passages: a UTF-8 file, or 'wikitext' through datasets",
                      json_schema_extra=PATH)
    passages: int = Field(500, ge=2, description="at most N passages (consecutive non-empty lines joined until "
                                                 "--length tokens; docs/evaluation.md)")
    length: int = Field(256, ge=4, description="tokens per passage; each is split at its midpoint into a query "
                                               "and its answer")
    batch_size: int = Field(32, ge=1, description="texts per forward pass")
    compare: str | None = Field(None, description="also run this original model and report the overlap of each "
                                                  "query's 10 nearest candidates with its",
                                json_schema_extra=PATH)


class InspectConfig(_Config):
    data: str = Field(description="text whose first --tokens tokens the model reads (one window): a UTF-8 file, or "
                                  "'wikitext' through datasets", json_schema_extra=PATH)
    tokens: int = Field(2048, ge=8, description="tokens in the window (at most the model's maximum positions)")
    layers: str | None = Field(None, description="layers to measure, e.g. '0-5,10' (default: every attention layer)")
    sinks: int = Field(4, ge=1, description="first tokens counted as attention sinks")
    band: int = Field(64, ge=1, description="keys within this distance of the query count as the local band")
    kpca_tokens: int = Field(128, ge=0, description="tokens (the first of the window) on which each KV head's values "
                                                    "are compared with the kernel-PCA prediction (0: skip)")
    compare: str | None = Field(None, description="also run this model (e.g. the original) and report each head's "
                                                  "output error against it", json_schema_extra=PATH)


class ReportConfig(_Lengths):
    data: str = Field(description="evaluation text (perplexity, calibration, speed prompts, inspect window): a UTF-8 "
                                  "file, or 'wikitext' through datasets", json_schema_extra=PATH)
    compare: str | None = Field(None, description="the original model, measured beside SOURCE (in a recipe: the "
                                                  "recipe's model unless given)", json_schema_extra=PATH)
    max_tokens: int = Field(16384, gt=1, description="perplexity and calibration: the first N tokens of the text")
    seq_len: int = Field(1024, ge=2, description="perplexity and calibration: window length (the standard protocol)")
    long_seq_len: int | None = Field(None, ge=0, description="long-context perplexity window (default: the model's "
                                                             "maximum positions, at most 8,192; 0: skip)")
    lengths: list[int] = Field([1024, 4096, 8192], description="context lengths of the speed and memory table")
    decode_tokens: int = Field(32, ge=1, description="greedy decode steps timed at each length (the prompt is the "
                                                     "length minus these)")
    inspect_tokens: int = Field(1024, ge=8, description="tokens in the window `inspect` reads")
    memory_context: int = Field(8192, ge=4, description="eval memory (models with a cache policy): document length; "
                                                        "the second half is scored")
    tasks: str | None = Field(None, description="lm-eval tasks, comma-separated (offline: attnswap_wikitext_nextsent); "
                                                "default: none")
    limit: int | None = Field(None, ge=1, description="lm-eval: first N items of each task")

    @model_validator(mode="after")
    def _lengths(self):
        if not self.lengths or min(self.lengths) < 2:
            raise ValueError("lengths: give positive context lengths, e.g. 1024,4096,8192")
        if self.max_tokens < self.seq_len:
            raise ValueError(f"max_tokens {self.max_tokens} is shorter than one window of seq_len {self.seq_len}")
        return self


class _Cache(_Config):
    policy: str | None = Field(None, description="cache policy (see 'attnswap list'; default: the model's own)")
    options: dict[str, Any] = Field(default_factory=dict, description="policy options, key: value (--set)",
                                    json_schema_extra=NO_CLI)
    budget: float | None = Field(None, gt=0, le=1, description="kept fraction per layer and KV head (default: the "
                                                               "policy's)")
    interval: int | None = Field(None, ge=1, description="evict every N tokens (default: the policy's)")

    def policy_options(self) -> dict:
        extra = {k: v for k, v in (("budget", self.budget), ("interval", self.interval)) if v is not None}
        return {**self.options, **extra}


class MemoryEvalConfig(_Cache):
    data: str = Field(description="text for long-context perplexity and passkey filler", json_schema_extra=PATH)
    tasks: list[Literal["ppl", "passkey"]] = Field(["ppl", "passkey"], description="ppl, passkey or both")
    context: int = Field(8192, ge=2, description="long-context perplexity: document length")
    score_from: int = Field(4096, ge=1, description="long-context perplexity: first scored token")
    documents: int = Field(1, ge=1, description="long-context perplexity: pooled over this many consecutive "
                                                "context-long stretches of the data")
    passkey_context: int = Field(4096, ge=64, description="passkey: prompt length")
    depths: list[float] = Field([0.1, 0.3, 0.5, 0.7, 0.9], description="passkey: depths of the key (fractions)")
    trials: int = Field(2, ge=1, description="passkey: keys per depth")

    @model_validator(mode="after")
    def _checks(self):
        if self.score_from >= self.context:
            raise ValueError(f"score_from {self.score_from} must be below context {self.context}")
        if not self.tasks:
            raise ValueError("give at least one task: ppl, passkey")
        if not all(0 <= d <= 1 for d in self.depths):
            raise ValueError("each depth is a fraction in [0, 1]")
        return self


class EvolveConfig(_Cache):
    data: str = Field(description="text for the task", json_schema_extra=PATH)
    task: Literal["ppl", "passkey"] = Field("ppl", description="ppl (long-context perplexity) or passkey")
    generations: int = Field(10, ge=0, description="CMA-ES generations")
    population: int = Field(8, ge=2, description="candidates per generation")
    budget: float | None = Field(0.25, gt=0, le=1, description="kept fraction while evolving")
    sigma: float = Field(0.1, ge=1e-6, description="CMA-ES initial step size")
    context: int = Field(4096, ge=2, description="ppl: document length; passkey: prompt length")
    score_from: int = Field(2048, ge=1, description="ppl: first scored token")
    documents: int = Field(1, ge=1, description="ppl: consecutive documents the fitness averages over (more "
                                                "generalise better, cost more)")
    trials: int = Field(1, ge=1, description="passkey: keys per depth")
    seed: int = Field(0, description="CMA-ES seed")
    init: str | None = Field(None, description="start from this parameters file (a vector evolved before) instead "
                                               "of the policy's initial vector", json_schema_extra=PATH)
    threads: int | None = Field(None, ge=1, description="intra-op threads per process (default: all cores, shared "
                                                      "by the processes under torchrun); fix it to compare runs")

    @model_validator(mode="after")
    def _checks(self):
        if self.task == "ppl" and self.score_from >= self.context:
            raise ValueError(f"score_from {self.score_from} must be below context {self.context}")
        return self

    def task_kw(self) -> dict:
        if self.task == "ppl":
            return {"context": self.context, "score_from": self.score_from, "documents": self.documents}
        return {"context": self.context, "trials": self.trials}


class GenerateConfig(_Lengths):
    prompt: str = Field(description="text to continue")
    max_new_tokens: int = Field(64, ge=1, description="tokens to generate")
    temperature: float = Field(0.0, ge=0, description="0: greedy; > 0: sampling")
    seed: int = Field(0, description="sampling seed")
    record_every: int = Field(0, ge=0, description="record cache bytes every K tokens")


class ExportConfig(_Config):
    merge_lora: bool = Field(True, description="merge LoRA into the weights (else keep adapter/ beside them)")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="weight dtype of the export")
    member: int | None = Field(None, ge=0, description="export only member K of an ensemble, merged into the "
                                                       "weights as a plain model")
    keep_fp32: bool = Field(False, description="keep tensors whose values exceed the dtype's range in fp32 "
                                               "(default: refuse the export, naming the tensor)")
    report: str | None = Field(None, description="a folder written by 'attnswap report': its page goes into the "
                                                 "model card and its files into report/ (in a recipe, the report "
                                                 "step's own)", json_schema_extra=PATH)


class Recipe(_Config):
    """convert -> evolve -> distill -> finetune -> eval (perplexity, memory, calibration, retrieval) -> report ->
    generate -> export, from one YAML file (recipes/*.yaml); every step but convert is optional."""

    model: str = Field(description="model source: alias, directory, .gguf file or hub id")
    convert: ConvertConfig
    evolve: EvolveConfig | None = None
    distill: DistillConfig | None = None
    finetune: FinetuneConfig | None = None
    eval: EvalConfig | None = None
    eval_memory: MemoryEvalConfig | None = None
    eval_calibration: CalibrationConfig | None = None
    eval_retrieval: RetrievalConfig | None = None
    report: ReportConfig | None = None
    generate: GenerateConfig | None = None
    export: ExportConfig | None = Field(default_factory=ExportConfig)
    out: str | None = Field(None, description="run directory (the CLI's --out overrides it)", json_schema_extra=PATH)

    @model_validator(mode="after")
    def _compare_default(self):
        # in a recipe, perplexity is compared with the recipe's model unless `compare: false`
        if self.eval is not None and self.eval.compare in (None, True):
            self.eval = self.eval.model_copy(update={"compare": self.model})
        elif self.eval is not None and self.eval.compare is False:
            self.eval = self.eval.model_copy(update={"compare": None})
        # retrieval too: beside the recipe's model unless another `compare` is given
        if self.eval_retrieval is not None and self.eval_retrieval.compare is None:
            self.eval_retrieval = self.eval_retrieval.model_copy(update={"compare": self.model})
        if self.report is not None and self.report.compare is None:
            self.report = self.report.model_copy(update={"compare": self.model})
        return self


STEPS = ("evolve", "distill", "finetune", "eval", "eval_memory", "eval_calibration", "eval_retrieval", "report",
         "generate", "export")


def field_help(model: type[BaseModel], name: str) -> str:
    return model.model_fields[name].description or ""


def is_path(model: type[BaseModel], name: str) -> bool:
    extra = model.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("path"))
