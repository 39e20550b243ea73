"""Layout-free, crash-safe training checkpoints.

Layout of ``<output_dir>/checkpoints``::

    step_00000100/
        dist/                 megatron dist_checkpointing (torch_dist): fp32 master weights,
                              Adam moments ("optimizer.exp_avg.*", "optimizer.exp_avg_sq.*") and
                              model buffers (codebook statistics), as global sharded tensors
        rank_states/rank_00000.pt   per-rank RNG states and data-loader position
        trainer_state.json    step, counters, LR schedule, optimizer step, layout, signature,
                              and the size of every other file (written after all of them)
        config.yaml           the resolved run config
        COMPLETE              written last: a directory without it is never used
    latest                    the tag of the newest complete checkpoint, replaced atomically

Why not ``engine.save_checkpoint``: DeepSpeed's MoE checkpoint code only understands its own
MoE layers (``deepspeed_moe.experts.deepspeed_experts.N``) and would keep only data-parallel
rank 0's experts of a megatron expert-parallel layer. Here every tensor is stored with its
global shape and offsets (megatron's ``sharded_state_dict``: TP slices and global expert ids), so
a checkpoint loads at ANY tensor/expert/data-parallel layout: changing EP or DP on resume needs
no conversion step. The ZeRO-partitioned master weights and moments are assembled with
DeepSpeed's tensor-fragment API (``safe_get_full_*``) and restored through the same fragment
mapping DeepSpeed's universal-checkpoint loader uses.

Crash safety: a save goes to ``step_N.partial/``, is renamed to ``step_N/`` when every rank has
written, gets ``COMPLETE``, and only then does ``latest`` move. Loading falls back to the newest
complete checkpoint when ``latest`` points at a missing or incomplete one. A complete checkpoint
whose files are missing or damaged (see ``checkpoint.files``) is refused naming the file and the
newest intact checkpoint of the run; a resume falls back to that one only with
``train.resume_fallback=true``.

Loading runs no code from the checkpoint: the rank files are read with ``weights_only=True``, the
tensor index and non-tensor items through ``compat.checkpoint_io``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.utils import safe_set_full_fp32_param
from deepspeed.utils.tensor_fragment import map_to_flat_opt_states
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
from torch.distributed.checkpoint.api import CheckpointException

from vqmoe_megatron.checkpoint.errors import CheckpointError
from vqmoe_megatron.checkpoint.files import (
    read_json_record,
    record_files,
    recorded_problem,
    structural_problem,
)
from vqmoe_megatron.compat.checkpoint_io import apply_checkpoint_io_patches
from vqmoe_megatron.compat.deepspeed_zero import (
    flat_optimizer_groups,
    full_fp32_param,
    optimizer_state_reader,
    optimizer_steps_taken,
)
from vqmoe_megatron.compat.lr_schedule import restore_lambda_schedule
from vqmoe_megatron.config import dump_yaml

READ_ERRORS = (Exception, CheckpointException)
"""What reading a damaged checkpoint raises (torch's CheckpointException is a BaseException)."""
COMPLETE = "COMPLETE"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
CHECKPOINT_VERSION = 1
ADAM_KEYS = ("exp_avg", "exp_avg_sq")

STRUCTURAL_FIELDS = {
    "model": (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "ffn_hidden_size",
        "vocab_size",
        "normalization",
        "activation",
        "position_embedding_type",
        "untie_embeddings_and_output_weights",
    ),
    "moe": (
        "num_experts",
        "expert_ffn_hidden_size",
        "layer_freq",
        "router",
        "routing_mode",
        "num_codes",
        "codebook_update",
        "discrete_layernorm",
    ),
    "finetune": ("task", "pooling"),
}
"""Settings that change the parameters (or, for fine-tuning, the task and its head): a checkpoint
only resumes a run that agrees on them. Sections a config lacks are skipped."""


def io_failure(exc: BaseException) -> str:
    """One line saying why reading or writing tensors failed (torch's CheckpointException
    carries every rank's exception with its traceback; only the exceptions are kept)."""
    causes = (
        [pair[0] for pair in exc.failures.values()]
        if isinstance(exc, CheckpointException)
        else [exc]
    )
    return "; ".join(
        sorted({f"{type(c).__name__}: {c}" if str(c) else type(c).__name__ for c in causes})
    )


def read_failure(exc: BaseException) -> str:
    """:func:`io_failure` of a read, with what it means."""
    return io_failure(exc) + " (a tensor file is missing, truncated or damaged)"


@dataclass
class TrainerState:
    """Scalars of a training run that a resume needs besides the tensors."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    optimizer_steps: int = 0
    scheduler_steps: int = 0
    layout: dict = field(default_factory=dict)
    signature: dict = field(default_factory=dict)
    data_fingerprint: str = ""
    tokenizer: dict = field(default_factory=dict)
    """The tokenizer the model learned ids of: ``{"sha256": ..., "model": path}`` (empty in
    checkpoints written before it was recorded)."""
    version: int = CHECKPOINT_VERSION
    files: dict = field(default_factory=dict)
    """Relative path -> bytes of every file of the checkpoint but this state and COMPLETE
    (empty in checkpoints written before the record existed)."""


def model_signature(cfg: Any) -> dict:
    """The structural settings of a run config (PretrainConfig, FinetuneConfig; see
    STRUCTURAL_FIELDS)."""
    return {
        f"{section}.{name}": getattr(getattr(cfg, section), name)
        for section, names in STRUCTURAL_FIELDS.items()
        if hasattr(cfg, section)
        for name in names
    }


ROUTING_MODE = "moe.routing_mode"
"""The one structural setting weights load across: a ``discrete`` model simply does not ask for
the router and gate weights of a ``pretrain`` checkpoint (the reverse fails naming them)."""


def signature_diffs(
    saved: dict, current: dict, given: str = "config", ignore: tuple[str, ...] = ()
) -> list[str]:
    """``key: checkpoint X, <given> Y`` for every setting of ``current`` that ``saved`` (both
    :func:`model_signature`) has otherwise."""
    return [
        f"{key}: checkpoint {saved.get(key)!r}, {given} {value!r}"
        for key, value in current.items()
        if key not in ignore and saved.get(key) != value
    ]


def check_signature(saved: dict, current: dict, path: Path, ignore: tuple[str, ...] = ()) -> None:
    """Refuse to resume a run whose structure differs from the checkpoint's."""
    diffs = signature_diffs(saved, current, ignore=ignore)
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written by a different model; refusing to resume. "
            + "; ".join(diffs)
            + ". Use the checkpoint's settings, or a new train.output_dir to start afresh."
        )


def tokenizer_record(sha256: str, model: str) -> dict:
    """What a checkpoint records of its tokenizer (``TrainerState.tokenizer``)."""
    return {"sha256": sha256, "model": str(model)}


ALLOW_TOKENIZER_CHANGE = "train.allow_tokenizer_change=true"


def check_tokenizer(recorded: dict, current: dict, path: Path, allowed: bool, remedy: str) -> bool:
    """Refuse ``current`` (a ``tokenizer_record``) when checkpoint ``path`` recorded another
    tokenizer: its ids would mean other text; ``remedy`` says what to do. ``allowed``
    (``train.allow_tokenizer_change``) lets it pass; returns whether the tokenizer changed."""
    changed = bool(recorded) and recorded.get("sha256") != current["sha256"]
    if changed and not allowed:
        raise CheckpointError(
            f"checkpoint {path} was trained with the tokenizer {recorded.get('model')} (sha256 "
            f"{recorded.get('sha256')}), but this run uses {current['model']} (sha256 "
            f"{current['sha256']}): the same ids would stand for other text. {remedy}"
        )
    return changed


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(path: Path) -> Optional[int]:
    name = path.name
    if not name.startswith("step_") or not name[5:].isdigit():
        return None
    return int(name[5:])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _step_of(p) is not None and (p / COMPLETE).is_file()]
    return sorted(found, key=_step_of)


def find_latest(root: Path) -> Optional[Path]:
    """The checkpoint to resume from: ``latest`` if complete, else the newest complete one."""
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / COMPLETE).is_file():
            return candidate
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def checkpoint_problem(step_dir: Path) -> Optional[str]:
    """The first missing or damaged file of complete checkpoint ``step_dir``, or None."""
    step_dir = Path(step_dir)
    marker = step_dir / COMPLETE
    if not marker.read_text(encoding="utf-8", errors="replace").strip().isdigit():
        return f"{marker} is damaged (it holds no step number)"
    try:
        raw = read_json_record(step_dir / STATE_FILE)
    except ValueError as exc:
        return str(exc)
    files = raw.get("files")
    if isinstance(files, dict) and files:
        problem = recorded_problem(step_dir, files)
        if problem:
            return problem
    layout = raw.get("layout")
    world_size = layout.get("world_size", 1) if isinstance(layout, dict) else 1
    return structural_problem(step_dir, world_size if isinstance(world_size, int) else 1)


def newest_intact(root: Path, exclude: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` other than ``exclude`` whose files are all
    there (None when there is none)."""
    for candidate in reversed(complete_checkpoints(root)):
        if candidate != exclude and checkpoint_problem(candidate) is None:
            return candidate
    return None


def intact_advice(step_dir: Path) -> str:
    """Which checkpoint of the same run to use instead of ``step_dir``."""
    step_dir = Path(step_dir)
    other = newest_intact(step_dir.parent, exclude=step_dir)
    if other is None:
        return "this run has no other intact checkpoint"
    return f"the newest intact checkpoint of this run is {other}: use it instead"


def damaged(step_dir: Path, problem: str) -> CheckpointError:
    """The error for a checkpoint that cannot be used: the problem and :func:`intact_advice`."""
    return CheckpointError(
        f"checkpoint {step_dir} is damaged: {problem}; {intact_advice(step_dir)}"
    )


def verify_checkpoint(step_dir: Path) -> Path:
    """``step_dir`` if all its files are there, else the :func:`damaged` error."""
    problem = checkpoint_problem(step_dir)
    if problem:
        raise damaged(step_dir, problem)
    return Path(step_dir)


def resolve_checkpoint(path: Path) -> Path:
    """The complete, intact step directory meant by ``path``: a run directory, its
    ``checkpoints`` directory (newest complete step) or a step directory."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return verify_checkpoint(path)
    for root in (path / "checkpoints", path):
        found = find_latest(root) if root.is_dir() else None
        if found is not None:
            return verify_checkpoint(found)
    if path.name.startswith("step_") and path.is_dir():
        raise CheckpointError(f"{path} is an incomplete checkpoint (no {COMPLETE} file)")
    raise CheckpointError(
        f"no complete checkpoint at {path}: give a run directory, its checkpoints/ directory "
        "or a checkpoints/step_* directory written by pretrain/pretrain_vqmoe.py"
    )


def check_backbone(saved: dict, current: dict, path: Path) -> None:
    """Refuse to load the weights of ``path`` (signature ``saved``) into a model of another
    structure; the routing mode may differ (:data:`ROUTING_MODE`)."""
    check_signature(saved, current, path, ignore=(ROUTING_MODE,))


def routing_hint(saved: dict, current: dict) -> str:
    """What a failed load of a ``discrete`` checkpoint into a ``pretrain`` model means."""
    if saved.get(ROUTING_MODE) == "discrete" and current.get(ROUTING_MODE) == "pretrain":
        return " (the checkpoint was trained in discrete mode: it has no router or gate)"
    return ""


def load_model_weights(
    model: torch.nn.Module, step_dir: Path, cfg: Any, prefix: str = ""
) -> TrainerState:
    """Load a checkpoint's fp32 weights and buffers into ``model`` (any TP/EP layout, no
    optimizer): the GPT, or a module laid out as the saving one (GPT and task head).

    ``prefix``: where the GPT's tensors sit in the checkpoint (``gpt.`` in a fine-tuning run's,
    beside its head); only they are read. The routing mode may differ (:func:`check_backbone`).
    Collective over all ranks.
    """
    state = CheckpointManager.read_state(step_dir)
    current = model_signature(cfg)
    check_backbone(state.signature, current, step_dir)
    template, _ = _sharded_state(model, None, for_load=True, prefix=prefix)
    hint = routing_hint(state.signature, current)
    loaded = _load_tensors(template, Path(step_dir), "the weights", hint)
    model.load_state_dict({key[len(prefix) :]: v for key, v in loaded.items()}, strict=True)
    return state


def missing_optimizer_state(gpt: torch.nn.Module, step_dir: Path) -> list[str]:
    """Adam moments a resume of ``gpt`` (any layout) needs that checkpoint ``step_dir`` lacks."""
    template, owners = _sharded_state(gpt, None, for_load=True)
    apply_checkpoint_io_patches()
    try:
        stored = set(dist_checkpointing.load_tensors_metadata(str(Path(step_dir) / "dist")))
    except READ_ERRORS as exc:
        raise CheckpointError(
            f"cannot read the tensor index of {step_dir}: {read_failure(exc)}; "
            + intact_advice(step_dir)
        ) from exc
    wanted = {
        f"optimizer.{name}.{template[key].key}"
        for key, param in owners.items()
        if param.requires_grad
        for name in ADAM_KEYS
    }
    return sorted(wanted - stored)


def _load_tensors(template: dict, step_dir: Path, what: str = "tensors", hint: str = "") -> dict:
    """``dist_checkpointing.load`` of ``step_dir`` (collective); a failure names the checkpoint
    and the intact one to use instead."""
    apply_checkpoint_io_patches()
    try:
        return dist_checkpointing.load(template, str(step_dir / "dist"))
    except READ_ERRORS as exc:
        raise CheckpointError(
            f"cannot read {what} of {step_dir}{hint}: {read_failure(exc)}; "
            + intact_advice(step_dir)
        ) from exc


def _rank_state_globals() -> list:
    """What a rank file holds besides tensors and plain Python values: numpy's uint32 RNG-state
    array, under the names numpy 1.x and 2.x pickle it with (``numpy.core`` became
    ``numpy._core``)."""
    array = np.zeros(1, dtype=np.uint32)
    reconstruct = array.__reduce__()[0]
    names = [
        (reconstruct, f"{module}.multiarray._reconstruct")
        for module in ("numpy.core", "numpy._core")
    ]
    return [np.ndarray, np.dtype, type(array.dtype), *names]


def read_rank_state(file: Path) -> dict:
    """A rank file's RNG and loader state, unpickled with ``weights_only=True`` (tensors, plain
    values and uint32 numpy arrays only: a tampered file runs no code)."""
    try:
        with torch.serialization.safe_globals(_rank_state_globals()):
            saved = torch.load(file, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for foreign pickles
        reason = str(exc).split("WeightsUnpickler error: ")[-1].splitlines()[0]
        raise damaged(file.parent.parent, f"{file} cannot be read safely ({reason})") from exc
    if not isinstance(saved, dict) or not {"rng", "loader"} <= set(saved):
        raise damaged(file.parent.parent, f"{file} is not a rank state file")
    return saved


def _sharded_state(
    model: torch.nn.Module, optimizer_engine: Optional[Any], for_load: bool, prefix: str = ""
) -> tuple[dict, dict[str, torch.nn.Parameter]]:
    """megatron sharded state dict with fp32 master weights and (optionally) Adam moments,
    plus the parameter behind each parameter entry's key.

    ``model`` is the GPT or any module with a megatron-style ``sharded_state_dict()`` whose
    entries wrap its parameters (a GPT plus a task head). For saving the tensors are gathered
    over data parallelism (a collective: every rank calls this with the same model); for
    loading they are empty fp32 templates. ``prefix`` (a GPT's only) names its entries as a
    module holding it under that name would.
    """
    params = {id(p): p for p in model.parameters()}
    state = {}
    owners = {}
    read_state = None
    if optimizer_engine is not None and not for_load:
        read_state = optimizer_state_reader(optimizer_engine)
    sharded = model.sharded_state_dict(prefix=prefix) if prefix else model.sharded_state_dict()
    for key, sh in sharded.items():
        param = params.get(id(sh.data)) if isinstance(sh, ShardedTensor) else None
        if param is None:
            state[key] = sh
            continue
        if for_load:
            master = torch.empty(param.shape, dtype=torch.float32, device=param.device)
        else:
            master = full_fp32_param(param)
        sh32 = replace(sh, data=master, dtype=torch.float32)
        state[key] = sh32
        owners[key] = param
        if optimizer_engine is None or not param.requires_grad:
            continue
        for name in ADAM_KEYS:
            if for_load:
                value = torch.empty_like(master)
            elif read_state is None:  # before the first optimizer step Adam's moments are zero
                value = torch.zeros_like(master)
            else:
                value = read_state(param, name)
            state[f"optimizer.{name}.{key}"] = make_sharded_optimizer_tensor(
                sh32, value.float(), f"optimizer.{name}"
            )
    return state, owners


def _restore_optimizer(engine: Any, moments: dict[torch.nn.Parameter, dict], step: int) -> None:
    """Rebuild ZeRO's flat Adam state from per-parameter full moments (DeepSpeed's own
    universal-checkpoint mechanism: fragments per low-precision param, then flat states)."""
    try:
        groups = flat_optimizer_groups(engine)
    except ValueError as exc:
        raise CheckpointError(f"cannot resume the optimizer state: {exc}") from exc
    base = engine.optimizer.optimizer
    torch_adam = isinstance(base, (torch.optim.Adam, torch.optim.AdamW))
    for lp_group, flat in groups:
        for lp in lp_group:
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is None:
                continue
            address = mapping.lp_fragment_address
            mapping.optim_fragment = {
                key: moments[lp][key].flatten().narrow(0, address.start, address.numel).to(flat)
                for key in ADAM_KEYS
            }
        map_to_flat_opt_states(flat, lp_group, base.state, set(ADAM_KEYS))
        base.state[flat]["step"] = torch.tensor(float(step)) if torch_adam else step


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves, finds, loads and prunes the checkpoints of one run directory."""

    def __init__(self, output_dir: Path, keep_last: int) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def latest(self) -> Optional[Path]:
        """The checkpoint a restart resumes from (None: start afresh)."""
        return find_latest(self.root)

    def save(
        self,
        model: torch.nn.Module,
        engine: Any,
        state: TrainerState,
        cfg: Any,
        loader_state: dict,
    ) -> Path:
        """Collective save of step ``state.step``; returns the complete checkpoint directory.

        ``model``: the GPT, or a module holding it with a ``sharded_state_dict()`` (task head);
        ``cfg``: the run config (PretrainConfig or FinetuneConfig), written as config.yaml.
        """
        tag = _tag(state.step)
        final = self.root / tag
        partial = self.root / f"{tag}.partial"
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            (partial / "rank_states").mkdir(parents=True)
            (partial / "dist").mkdir()
        _barrier()
        sharded, _ = _sharded_state(model, engine, for_load=False)
        apply_checkpoint_io_patches()
        try:
            dist_checkpointing.save(sharded, str(partial / "dist"))
            torch.save(
                {"rng": _rng_state(), "loader": loader_state},
                partial / "rank_states" / f"rank_{self.rank:05d}.pt",
            )
        except (OSError, RuntimeError, CheckpointException) as exc:  # a full disk, say
            shutil.rmtree(partial, ignore_errors=True)
            free = shutil.disk_usage(self.root).free / 2**20
            raise CheckpointError(
                f"cannot write checkpoint {final} ({io_failure(exc)}); {free:.0f} MiB free in {self.root}. "
                "The previous checkpoints are untouched; free space and restart to resume"
            ) from exc
        if self.rank == 0:
            state.optimizer_steps = optimizer_steps_taken(engine)
            state.scheduler_steps = engine.lr_scheduler.last_epoch
            dump_yaml(cfg, partial / "config.yaml")
        _barrier()
        if self.rank == 0:
            self.write_state(partial, state)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            (final / COMPLETE).write_text(f"{state.step}\n", "utf-8")
            pointer = self.root / f"{LATEST}.tmp"
            pointer.write_text(tag, "utf-8")
            os.replace(pointer, self.root / LATEST)
            self._prune(keep=final)
        _barrier()
        return final

    def _prune(self, keep: Path) -> None:
        complete = complete_checkpoints(self.root)
        for old in complete[: max(len(complete) - self.keep_last, 0)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)

    def resume_point(self, fallback: bool) -> tuple[Optional[Path], Optional[str]]:
        """The checkpoint a restart resumes from (None: start afresh) and, when it is not the
        latest one because that one is damaged and ``fallback`` allows another, why."""
        latest = self.latest()
        problem = checkpoint_problem(latest) if latest is not None else None
        if problem is None:
            return latest, None
        error = damaged(latest, problem)
        other = newest_intact(self.root, exclude=latest)
        if not fallback or other is None:
            hint = " (or set train.resume_fallback=true to resume from it)" if other else ""
            raise CheckpointError(f"{error}{hint}")
        return other, f"{error}; train.resume_fallback=true: resuming from {other}"

    @staticmethod
    def write_state(step_dir: Path, state: TrainerState) -> None:
        """Write ``trainer_state.json`` with the size of every other file of ``step_dir``."""
        state.files = record_files(step_dir, exclude=(STATE_FILE, COMPLETE))
        (step_dir / STATE_FILE).write_text(json.dumps(asdict(state), indent=2), "utf-8")

    @staticmethod
    def read_state(path: Path) -> TrainerState:
        """The trainer state of a checkpoint directory (refuses damaged or foreign files)."""
        file = path / STATE_FILE
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{file} is missing or damaged ({exc}); remove {path}") from exc
        if raw.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"{file} has checkpoint version {raw.get('version')!r}, this code reads "
                f"{CHECKPOINT_VERSION}"
            )
        try:
            return TrainerState(**raw)
        except TypeError as exc:
            raise CheckpointError(f"{file} does not describe a training state ({exc})") from exc

    def load(
        self, path: Path, model: torch.nn.Module, engine: Any, cfg: Any
    ) -> tuple[TrainerState, Optional[dict]]:
        """Load a checkpoint into model + engine at the current layout (``model`` and ``cfg`` as
        for :meth:`save`).

        Returns the trainer state and this rank's saved loader state (None when the data-parallel
        layout changed, since per-rank data positions do not carry over to other ranks).
        """
        state = self.read_state(path)
        check_signature(state.signature, model_signature(cfg), path)
        template, owners = _sharded_state(model, engine, for_load=True)
        loaded = _load_tensors(template, path)
        moments: dict[torch.nn.Parameter, dict] = {}
        model_state = {}
        for key, value in loaded.items():
            if key.startswith("optimizer."):
                continue
            model_state[key] = value
            param = owners.get(key)
            if param is None or not param.requires_grad:
                continue
            safe_set_full_fp32_param(param, value)
            moments[param] = {name: loaded[f"optimizer.{name}.{key}"] for name in ADAM_KEYS}
        model.load_state_dict(model_state, strict=True)
        _restore_optimizer(engine, moments, state.optimizer_steps)
        restore_lambda_schedule(
            engine.lr_scheduler, engine.optimizer.param_groups, state.scheduler_steps
        )
        engine.global_steps = state.step
        engine.global_samples = state.consumed_samples
        engine.skipped_steps = state.skipped_steps
        now = current_layout()
        # Per-rank data positions and RNG streams carry over when every rank keeps its data-
        # parallel position: same world, TP and DP sizes (EP may change: it splits no data).
        same_data_ranks = all(
            state.layout.get(key) == now[key]
            for key in ("world_size", "tensor_parallel", "data_parallel")
        )
        loader_state = None
        rank_file = path / "rank_states" / f"rank_{self.rank:05d}.pt"
        if same_data_ranks and rank_file.is_file():
            saved = read_rank_state(rank_file)
            _set_rng_state(saved["rng"])
            loader_state = saved["loader"]
        return state, loader_state


def current_layout() -> dict:
    """This run's parallel layout (to detect layout changes on resume)."""
    from megatron.core import parallel_state

    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "expert_parallel": parallel_state.get_expert_model_parallel_world_size(),
        "data_parallel": parallel_state.get_data_parallel_world_size(),
    }
