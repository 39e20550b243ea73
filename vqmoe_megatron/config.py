"""Typed run configuration: dataclasses loaded from YAML, overridable from the command line.

Every run (pretraining, fine-tuning, conversion) is described by one dataclass tree. A YAML file
under version control gives the base values; ``section.key=value`` overrides on the command line
replace single fields (values are parsed as YAML, so ``moe.topk=2``, ``train.lr=3e-4`` and
``moe.z_loss_coeff=null`` all work). Unknown keys and values of the wrong type are refused with
one message that names the setting, where it came from, and the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message says which and why."""


RoutingMode = Literal["pretrain", "discrete"]
"""How VQMoE layers route: 'pretrain' mixes the continuous router's and the nearest code's
experts by the gate; 'discrete' uses the nearest code only (router and gate dropped). The one
definition of the values: ``moe.routing_mode``, ``finetune.routing``, the ``--routing`` flags
and the megatron config (``vqmoe_routing_mode``) all take them from here."""
ROUTING_MODES: tuple[str, ...] = typing.get_args(RoutingMode)


@dataclass
class ModelConfig:
    """The transformer trunk (megatron-core GPTModel)."""

    num_layers: int = 4
    """Transformer layers (every ``moe.layer_freq``-th one is an MoE layer)."""
    hidden_size: int = 256
    """Model width d."""
    num_attention_heads: int = 8
    """Attention heads (hidden_size must be divisible by it)."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; None: one per attention head (MHA)."""
    ffn_hidden_size: int = 1024
    """FFN width of the dense (non-MoE) layers."""
    vocab_size: Optional[int] = None
    """Tokenizer vocabulary size; None takes it from the data manifest (checked against it)."""
    seq_length: int = 512
    """Tokens per training sample; must equal the shards' ``seq_length``."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Norm of every layer and the final norm."""
    activation: Literal["gelu", "swiglu"] = "gelu"
    """FFN activation of dense layers and experts (swiglu doubles the first projection)."""
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    """Rotary (rope) or learned absolute position embeddings."""
    rotary_base: int = 10000
    """Base of the rotary frequencies."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP outputs."""
    attention_dropout: float = 0.0
    """Dropout of the attention probabilities."""
    init_method_std: float = 0.02
    """Standard deviation of the normal initialisation of all weights (and routers)."""
    untie_embeddings_and_output_weights: bool = False
    """Give the LM output layer its own weights instead of the input embedding's."""
    use_transformer_engine: Literal["auto", "never"] = "auto"
    """'auto' uses Transformer Engine layer specs when TE is importable and CUDA is present."""


@dataclass
class MoEConfig:
    """VQMoE layers (METHOD.md) and the router baselines used for comparison."""

    num_experts: int = 16
    """Experts E per MoE layer (0: a dense model)."""
    expert_ffn_hidden_size: int = 512
    """FFN width of each expert."""
    layer_freq: int = 1
    """Every ``layer_freq``-th layer is an MoE layer (1: all layers), counting from the first."""
    router: Literal[
        "vqmoe", "topk", "xmoe", "hash", "smoe_dropout", "stablemoe", "dense", "vq_only"
    ] = "vqmoe"
    """'vqmoe': the two-path VQMoE router; 'topk': megatron-core's TopKRouter (SMoE); 'xmoe':
    X-MoE's low-dimensional router; 'hash': a fixed token-id -> expert table; 'smoe_dropout': a
    frozen random router whose k grows; 'stablemoe': StableMoE's two stages. Presets: 'vq_only'
    is 'vqmoe' with routing_mode 'discrete' from scratch; 'dense' replaces every MoE layer by a
    dense FFN of width topk x expert_ffn_hidden_size (top-k's active parameters), num_experts 0."""
    routing_mode: RoutingMode = "pretrain"
    """'pretrain': router + VQ paths mixed by the gate; 'discrete': nearest code only."""
    topk: int = 1
    """Experts per token on the continuous (router) path."""
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """megatron's token dispatcher: all-to-all or all-gather between expert-parallel ranks."""
    capacity_factor: Optional[float] = None
    """None: dropless. Only the continuous path is capacity-limited."""
    expert_backend: Literal["auto", "grouped", "sequential", "te"] = "auto"
    """Routed-expert kernels (same weights and checkpoints for all): 'grouped' (one
    torch._grouped_mm per projection, CPU and CUDA), 'sequential' (megatron's SequentialMLP, a
    loop over experts), 'te' (Transformer Engine's grouped linear; CUDA with TE); 'auto': 'te'
    where the model uses Transformer Engine, else 'grouped'."""

    # Continuous router.
    pre_softmax: bool = True
    """Softmax over all experts before top-k, so a top-1 router still gets a gradient."""
    aux_loss_coeff: float = 0.01
    """lambda_bal: Switch load-balancing loss weight (per layer)."""
    z_loss_coeff: Optional[float] = None
    """Router z-loss weight (None: off)."""
    reference_router: bool = False
    """Reproduce the reference code: softmax over the selected logits only and no balance loss."""
    router_dtype: Literal["fp32", "fp64"] = "fp32"
    """Precision of the router, gate and code-distance arithmetic."""

    # Baseline routers (docs/BASELINES.md).
    xmoe_dim: int = 16
    """X-MoE: dimension of the bias-free token projection and of the expert embeddings."""
    xmoe_temperature: Optional[float] = None
    """X-MoE: None scores ``proj(x) . normalise(e)`` (torchscale's code); a value scores
    ``cos(proj(x), e) / tau`` with a learnable tau starting at this value (the paper's formula)."""
    smoe_dropout_k_min: Optional[int] = None
    """SMoE-Dropout: experts per token at step 0 (None: topk)."""
    smoe_dropout_k_max: Optional[int] = None
    """SMoE-Dropout: experts per token at the end of the ramp (None: num_experts)."""
    smoe_dropout_ramp_steps: int = 1000
    """SMoE-Dropout: optimizer steps over which k grows linearly (the paper: all of training)."""
    smoe_dropout_eval_k: Optional[int] = None
    """SMoE-Dropout: experts per token in evaluation and fine-tuning (None: all experts)."""
    stablemoe_stage1_steps: int = 1000
    """StableMoE: optimizer steps of stage 1 (learn to route + distil); later steps route with
    the distilled router, frozen (the paper: 10% of training)."""
    stablemoe_distill_dim: int = 50
    """StableMoE: width of the distilled router's token-id embedding and centroids."""
    stablemoe_balance_coeff: float = 0.3
    """StableMoE: weight of its balance loss (stage 1)."""
    stablemoe_distill_coeff: float = 0.3
    """StableMoE: weight of the distillation cross-entropy (stage 1)."""

    # Discrete (vector-quantized) path.
    num_codes: Optional[int] = None
    """Codebook size K (default: num_experts). Code j serves expert j mod E."""
    distance: Literal["l2", "cosine"] = "l2"
    """Nearest-code metric: squared L2 (the paper's) or cosine."""
    expert_input: Literal["paper", "token", "quantized"] = "paper"
    """What the discrete expert sees: paper ((1-rho)x + rho*sg(q-x)), token (x), quantized (STE)."""
    contrib_rate: float = 0.05
    """rho of the 'paper' expert input."""
    discrete_layernorm: bool = False
    """Wrap the discrete expert as LN(FFN(LN(x_d))) like the post-LN reference code."""
    vq_loss_coeff: float = 0.08
    """beta_vq: weight of the VQ loss (per layer)."""
    commitment_cost: float = 0.25
    """beta of the VQ loss: weight of the term that commits tokens to their codes."""
    codebook_init: Literal["normal", "kmeans"] = "normal"
    """normal: N(0, codebook_init_std^2); kmeans: k-means over the first batch, per layer."""
    codebook_init_std: float = 0.02
    """Standard deviation of the normal codebook initialisation."""
    kmeans_iters: int = 10
    """Lloyd iterations of the k-means initialisation."""
    codebook_update: Literal["gradient", "ema"] = "gradient"
    """gradient: the VQ loss learns the codebook; ema: moving averages of each code's tokens (docs/METHOD.md section 5)."""
    ema_decay: float = 0.99
    """Decay of the EMA codebook statistics."""
    dead_code_interval: int = 100
    """Optimizer steps between dead-code restarts (0 disables restarts)."""
    dead_code_threshold: float = 1e-3
    """A code is dead when it received less than this fraction of its fair share of tokens."""
    train_codebook_in_discrete: bool = False
    """Keep learning the codebook in discrete mode (frozen by default)."""
    vq_loss_in_discrete: bool = True
    """Keep the VQ loss in discrete mode (with a frozen codebook only its commitment term acts)."""

    # Toward router-free inference (METHOD.md section 8): pretraining-only options, all off by
    # default (the paper's method); fine-tuning turns them off.
    router_alignment_coeff: float = 0.0
    """Weight of CE(router logits, nearest code's expert): teaches the continuous router to
    choose the expert the codebook chooses, so dropping the router moves fewer tokens (0: off)."""
    gate_discrete_coeff: float = 0.0
    """Weight of mean(-log g_d), a loss that moves the gate toward the discrete path (0: off)."""
    gate_discrete_start: int = 0
    """Optimizer step from which the gate loss acts (it ramps up over gate_discrete_ramp_steps)."""
    gate_discrete_ramp_steps: int = 1
    """Steps over which the gate loss grows linearly to its full weight."""
    discrete_phase_start: Optional[int] = None
    """From this optimizer step on, pretraining routes by the nearest code only (router and gate
    stay in the model, unused), so experts and codebook adapt to router-free inference within
    the step budget; the codebook keeps learning (None: off)."""

    @property
    def codebook_size(self) -> int:
        """K: ``num_codes``, or ``num_experts`` when it is not set."""
        return self.num_codes or self.num_experts

    def __post_init__(self) -> None:
        if self.router == "vq_only":  # a preset: written to config.yaml as what it means
            self.router = "vqmoe"
            self.routing_mode = "discrete"


@dataclass
class ParallelConfig:
    """Model parallel layout; data parallelism is whatever is left of the world size."""

    tensor_parallel: int = 1
    """Tensor-parallel size (megatron TP; with sequence parallelism, which MoE requires)."""
    expert_parallel: int = 1
    """Expert-parallel size: each rank holds num_experts / expert_parallel experts."""
    sequence_parallel: Optional[bool] = None
    """Defaults to True whenever tensor_parallel > 1 (megatron requires it for MoE training)."""


@dataclass
class DataSource:
    """One corpus of a blend (``data.sources``): Megatron's ``--data-path W PATH`` pair."""

    path: str
    """A shard directory: local path, ``http(s)://`` prefix or ``pipe:`` command template."""
    weight: float
    """Share of the training samples (the weights are normalised to sum to 1)."""
    name: Optional[str] = None
    """Label in logs and metrics (default: the last component of ``path``)."""


@dataclass
class DataConfig:
    """WebDataset shards written by ``data_tools/shard.py``."""

    data_dir: Optional[str] = None
    """A shard directory: local path, ``http(s)://`` prefix or ``pipe:`` command template."""
    sources: list[DataSource] = field(default_factory=list)
    """Instead of ``data_dir``: several weighted shard directories (same tokenizer and packing);
    each one's valid split is evaluated on its own."""
    micro_batch_size: int = 8
    """Samples per micro-batch and data-parallel rank."""
    num_workers: int = 1
    """Loader worker processes per rank (0: read in the training process)."""
    seed: int = 1234
    """Seed of the per-epoch shard and sample shuffles."""
    verify_checksums: bool = False
    """Check every shard's sha256 against the manifest as it is read."""
    fetch_attempts: int = 4
    """Tries per remote file (manifest or shard) before the run stops naming it."""
    fetch_backoff_s: float = 1.0
    """Sleep before the second try of a remote file; doubled before each further one."""
    fetch_timeout_s: float = 120.0
    """Per-try timeout of a remote file (HTTP connect/read, or the pipe: command)."""


@dataclass
class TrainConfig:
    """Optimisation, DeepSpeed engine, checkpointing and logging."""

    output_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, TensorBoard logs, checkpoints/; a directory with checkpoints resumes."""
    seed: int = 1234
    """Seed of the initialisation, dropout and everything else drawn at random."""
    steps: int = 1000
    """Optimizer steps of the run."""
    lr: float = 3.5e-4
    """Peak learning rate (AdamW)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine or linear decay."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr."""
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    """Decay after the warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 0.25
    """Global gradient-norm clipping (0: off)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step and data-parallel rank."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision (bf16 keeps fp32 master weights in ZeRO)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (1 or 2; 3 does not support expert parallelism)."""
    deepspeed_config: Optional[str] = None
    """Optional DeepSpeed JSON whose entries override the ones derived from this config."""
    log_interval: int = 10
    """Steps between log lines (loss, throughput, routing metrics)."""
    eval_interval: int = 200
    """Steps between evaluations of the valid split (0: only at the end of fine-tuning epochs)."""
    eval_batches: Optional[int] = 20
    """Valid micro-batches per evaluation (None: the whole valid split)."""
    save_interval: int = 500
    """Steps between checkpoints (a final one is always written)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted after a save completes."""
    max_nonfinite_steps: int = 5
    """Abort after this many consecutive non-finite losses (the last good checkpoint stays)."""
    tensorboard: bool = True
    """Write TensorBoard logs next to metrics.jsonl."""
    dead_code_warn_fraction: float = 0.25
    """Warn when a layer has this fraction of its codes dead in a log window."""
    imbalance_warn_ratio: float = 4.0
    """Warn when a layer's busiest expert gets this many times the mean rows."""
    peak_tflops: Optional[float] = None
    """Per-device peak for MFU; None looks up known GPUs (bf16) and omits MFU otherwise."""
    recompute_activations: bool = False
    """Full activation recomputation per transformer layer (GPU; saves memory)."""
    reset_dataloader: bool = False
    """On resume, start the data stream afresh instead of continuing it (e.g. new data)."""
    allow_tokenizer_change: bool = False
    """Resume (or fine-tune, convert) with a tokenizer other than the one the checkpoint was
    trained with (by sha256); refused unless set, since the ids then mean other text."""
    resume_fallback: bool = False
    """On resume, when the newest complete checkpoint has a missing or damaged file, resume from
    the newest intact one instead of stopping with an error."""
    inject_nonfinite_steps: list[int] = field(default_factory=list)
    """Fault injection for tests: make the loss NaN at these steps."""


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        apply_dense_preset(self.model, self.moe)


def apply_dense_preset(model: ModelConfig, moe: MoEConfig) -> None:
    """``moe.router: dense``: the same model with dense FFNs of top-k's active width.

    Sets ``model.ffn_hidden_size = moe.topk * moe.expert_ffn_hidden_size`` and
    ``moe.num_experts = 0`` (in place, so config.yaml records the dense model it trained).
    """
    if moe.router != "dense" or moe.num_experts == 0:
        return
    if moe.layer_freq != 1:
        raise ConfigError(
            f"moe.router=dense with moe.layer_freq={moe.layer_freq}: the dense baseline replaces "
            "every layer's FFN; use moe.layer_freq=1"
        )
    model.ffn_hidden_size = moe.topk * moe.expert_ffn_hidden_size
    moe.num_experts = 0


@dataclass
class FinetuneSettings:
    """One GLUE fine-tuning run (``finetune/glue.py``): the task, where the weights come from,
    the head, and the schedule in epochs."""

    task: Optional[str] = None
    """GLUE task name, case and '-'/'_' ignored (sst2, MNLI, sts-b, ...)."""
    data_dir: Optional[str] = None
    """GLUE data folder that holds ``<task>/`` (e.g. data/glue, with data/glue/SST-2/*.tsv)."""
    pretrained: Optional[str] = None
    """Pretraining run, its checkpoints/ or a step_* directory, or a consolidated directory."""
    tokenizer: Optional[str] = None
    """sentencepiece model; None: the consolidated directory's tokenizer.model, else the one in
    the pretraining data's manifest."""
    routing: Optional[RoutingMode] = None
    """'discrete': router and gate dropped, nearest code only (METHOD.md section 3);
    'pretrain': the checkpoint's router kept (for VQMoE: router and gate, the ablation);
    None: follow the router ('discrete' for VQMoE, 'pretrain' for every other router)."""
    train_codebook: bool = False
    """Learn the codebook (and restart dead codes); frozen by default, in both routing modes."""
    vq_loss: bool = True
    """Keep the VQ loss (with a frozen codebook: the commitment term only moves the tokens)."""
    pooling: Literal["last", "mean"] = "last"
    """Sentence vector for the head: the last real token (EOS, which attends to the whole input
    under causal attention) or the mean over real tokens."""
    head_dropout: float = 0.1
    """Dropout before the classification head."""
    max_seq_length: Optional[int] = None
    """Longer inputs are truncated (longest text first); None: the model's seq_length."""
    micro_batch_size: int = 32
    """Examples per micro-batch and data-parallel rank."""
    epochs: int = 3
    """Passes over the training split (unless steps is set)."""
    steps: Optional[int] = None
    """Stop after this many optimizer steps instead of ``epochs`` epochs."""
    warmup_fraction: float = 0.1
    """LR warmup as a fraction of all steps (sets train.warmup_steps)."""


def _finetune_train_defaults() -> TrainConfig:
    return TrainConfig(
        output_dir="",
        lr=1e-4,
        lr_schedule="linear",
        weight_decay=0.01,
        grad_clip=1.0,
        log_interval=50,
        eval_interval=0,
        save_interval=1000,
        keep_last=1,
        tensorboard=False,
    )


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs. ``model`` and ``moe`` start from the pretrained
    checkpoint's config; an empty ``train.output_dir`` means ``runs/glue/<task>``;
    ``train.steps`` and ``train.warmup_steps`` are derived from ``finetune`` (epochs or steps,
    warmup fraction) when the run starts, and ``moe.routing_mode``, ``moe.train_codebook_in_discrete``
    and ``moe.vq_loss_in_discrete`` from ``finetune.routing``, ``train_codebook`` and ``vq_loss``;
    giving any of these five yourself is refused."""

    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=_finetune_train_defaults)


FINETUNE_DERIVED = {
    "train.steps": "finetune.epochs (--epochs) or finetune.steps (--steps)",
    "train.warmup_steps": "finetune.warmup_fraction",
    "moe.routing_mode": "finetune.routing (--routing)",
    "moe.train_codebook_in_discrete": "finetune.train_codebook (--train_codebook)",
    "moe.vq_loss_in_discrete": "finetune.vq_loss (--no_vq_loss)",
}
"""Settings a fine-tuning run derives from its ``finetune`` section (key -> what sets it)."""


def refuse_derived_settings(given: dict, source: str) -> None:
    """Refuse fine-tuning settings from ``source`` (``given``: a YAML file's mapping or the
    command line's overrides) that set a key of :data:`FINETUNE_DERIVED` itself: the run would
    replace it."""
    for key, setter in FINETUNE_DERIVED.items():
        section, name = key.split(".")
        if name in (given.get(section) or {}):
            raise ConfigError(
                f"{source}: '{key}' is derived by fine-tuning from {setter}; set that instead "
                f"and drop '{key}'"
            )


def finetune_schedule(ft: FinetuneSettings, steps_per_epoch: int) -> tuple[int, int]:
    """A fine-tuning run's (``train.steps``, ``train.warmup_steps``): ``finetune.steps``, else
    ``finetune.epochs`` epochs of ``steps_per_epoch``; the warmup ``finetune.warmup_fraction``
    of them."""
    steps = ft.steps or ft.epochs * steps_per_epoch
    return steps, round(ft.warmup_fraction * steps)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _close_match(name: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(options)}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int -> float is allowed)."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")


def from_dict(cls: type[T], data: dict, source: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, refusing unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{source}: '{prefix}{key}'"
        if key not in names:
            raise ConfigError(
                f"{where} is not a setting of {cls.__name__}{_close_match(key, names)}"
            )
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = from_dict(tp, value, source, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, where)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: '{prefix}{missing[0]}' is required in {cls.__name__}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict:
    """Turn ``["moe.topk=2", "train.lr=1e-3"]`` into a nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' must look like section.key=value (for example moe.topk=2)"
            )
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from exc
        _set_dotted(tree, key.strip(), value)
    return tree


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: Union[str, Path]) -> dict:
    """Read a YAML mapping, with one clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(
    cls: type[T], path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()
) -> T:
    """Load ``cls`` from an optional YAML file plus ``key=value`` overrides."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    updates = parse_overrides(overrides)
    try:
        from_dict(cls, data, source)
        from_dict(cls, updates, "command line")
        return from_dict(cls, merge(data, updates), source)
    except TypeError as exc:  # a dataclass __post_init__ or missing required field
        raise ConfigError(f"{source}: {exc}") from exc


def dump_yaml(cfg: Any, path: Union[str, Path]) -> None:
    """Write the resolved config next to a run's outputs (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
