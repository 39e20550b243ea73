"""The variants ``vqmoe-compare`` can train: every router of ``moe.router``, and the ablation
rows of METHOD.md section 5 (expert input, codebook update) as named variants of ``vqmoe``.

A :class:`Variant` is a set of pretraining settings, the routing modes it is evaluated in, and
the fine-tuning runs made from it. Settings that depend on the training budget (StableMoE's
stage 1 is the paper's 10% of training; SMoE-Dropout's k ramps over all of it) are derived from
the number of steps, and a user's own ``moe.*`` overrides still win over them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Finetuning:
    """One fine-tuning run made from each pretrained seed of a variant."""

    name: str
    """Directory name and table key ('default' follows the router, finetune.routing None)."""
    label: str
    """What it changes, for the report."""
    args: tuple[str, ...] = ()
    """Extra ``finetune/glue.py`` arguments."""


DEFAULT_FINETUNING = Finetuning("default", "the router's own fine-tune routing")


@dataclass(frozen=True)
class Variant:
    """One pretraining recipe compared over seeds."""

    name: str
    label: str
    settings: tuple[str, ...]
    """``section.key=value`` pretraining overrides (on top of the comparison's config)."""
    evaluations: tuple[str, ...] = ("pretrain",)
    """Routing modes evaluated on the valid split ('pretrain': as trained)."""
    finetunings: tuple[Finetuning, ...] = (DEFAULT_FINETUNING,)
    ablation_of: str = ""
    """The variant this row changes one thing of ('' for a router of its own)."""

    @property
    def has_experts(self) -> bool:
        return self.name != "dense"

    def pretrain_settings(self, steps: int) -> list[str]:
        """The variant's overrides for a run of ``steps`` optimizer steps."""
        last_tenth = f"moe.discrete_phase_start={steps - steps // 10 + 1}"
        budget = {
            "stablemoe": [f"moe.stablemoe_stage1_steps={max(1, steps // 10)}"],
            "smoe_dropout": [f"moe.smoe_dropout_ramp_steps={steps}"],
            "vqmoe_gate_push": [
                f"moe.gate_discrete_start={steps // 2}",
                f"moe.gate_discrete_ramp_steps={max(1, steps // 4)}",
            ],
            "vqmoe_discrete_phase": [last_tenth],
            "vqmoe_align_phase": [last_tenth],
        }
        return [*budget.get(self.name, []), *self.settings]


VQ_BOTH_MODES = ("pretrain", "discrete")

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "vqmoe",
            "VQMoE: router + nearest code mixed by the gate",
            ("moe.router=vqmoe",),
            evaluations=VQ_BOTH_MODES,
            finetunings=(
                Finetuning("default", "discrete routing, codebook frozen (the method)"),
                Finetuning(
                    "codebook_trained",
                    "discrete routing, codebook trained",
                    ("--train_codebook",),
                ),
                Finetuning("router_kept", "router and gate kept", ("--routing", "pretrain")),
            ),
        ),
        Variant(
            "vq_only",
            "VQ routing only, from scratch (no router)",
            ("moe.router=vq_only",),
            evaluations=("discrete",),
            ablation_of="vqmoe",
        ),
        Variant(
            "vqmoe_token_input",
            "VQMoE, discrete expert sees the token (expert_input token, not paper)",
            ("moe.router=vqmoe", "moe.expert_input=token"),
            evaluations=VQ_BOTH_MODES,
            ablation_of="vqmoe",
        ),
        Variant(
            "vqmoe_ema",
            "VQMoE, codebook learnt by EMA (not gradient)",
            ("moe.router=vqmoe", "moe.codebook_update=ema"),
            evaluations=VQ_BOTH_MODES,
            ablation_of="vqmoe",
        ),
        Variant(
            "vqmoe_align",
            "VQMoE + router alignment loss (router learns the nearest code's expert)",
            ("moe.router=vqmoe", "moe.router_alignment_coeff=0.1"),
            evaluations=VQ_BOTH_MODES,
            ablation_of="vqmoe",
        ),
        Variant(
            "vqmoe_gate_push",
            "VQMoE + gate loss toward the discrete path from half-way (ramp over a quarter)",
            ("moe.router=vqmoe", "moe.gate_discrete_coeff=0.1"),
            evaluations=VQ_BOTH_MODES,
            ablation_of="vqmoe",
        ),
        Variant(
            "vqmoe_discrete_phase",
            "VQMoE, the last 10% of the steps routed discretely (router dropped)",
            ("moe.router=vqmoe",),
            evaluations=VQ_BOTH_MODES,
            ablation_of="vqmoe",
        ),
        Variant(
            "vqmoe_align_phase",
            "VQMoE + router alignment loss + discrete last 10%",
            ("moe.router=vqmoe", "moe.router_alignment_coeff=0.1"),
            evaluations=VQ_BOTH_MODES,
            ablation_of="vqmoe",
        ),
        Variant(
            "vqmoe_kmeans",
            "VQMoE, codebook initialised by k-means on the first batch",
            ("moe.router=vqmoe", "moe.codebook_init=kmeans"),
            evaluations=VQ_BOTH_MODES,
            ablation_of="vqmoe",
        ),
        Variant("topk", "SMoE: softmax top-k router (megatron-core)", ("moe.router=topk",)),
        Variant(
            "topk2",
            "SMoE top-2 (twice the expert compute of top-1)",
            ("moe.router=topk", "moe.topk=2"),
        ),
        Variant("xmoe", "X-MoE: low-dimensional normalised router", ("moe.router=xmoe",)),
        Variant(
            "stablemoe",
            "StableMoE: learn to route (10% of steps), then a frozen distilled router",
            ("moe.router=stablemoe",),
        ),
        Variant(
            "smoe_dropout",
            "SMoE-Dropout: frozen random router, k grows to all experts",
            ("moe.router=smoe_dropout",),
        ),
        Variant("hash", "Hash layer: fixed token-id -> expert table", ("moe.router=hash",)),
        Variant(
            "dense",
            "dense FFN of top-k's active width (no experts)",
            ("moe.router=dense",),
        ),
    )
}
"""Every variant by name, in the order the report lists them."""


def select(names: list[str]) -> list[Variant]:
    """The variants named (in the given order), refusing unknown or repeated names."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(
            f"unknown variant(s) {', '.join(unknown)}: choose among {', '.join(VARIANTS)}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"variant(s) named twice: {', '.join(repeated)}")
    return [VARIANTS[n] for n in names]
