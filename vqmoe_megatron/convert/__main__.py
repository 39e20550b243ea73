"""``python -m vqmoe_megatron.convert`` / ``vqmoe-convert``: checkpoint conversion.

    vqmoe-convert consolidated CHECKPOINT OUT [--tokenizer M] [--tensor-parallel T --expert-parallel E]
    vqmoe-convert hf CHECKPOINT OUT [--routing pretrain|discrete] [--tokenizer M]
    torchrun --nproc_per_node N -m vqmoe_megatron.convert reshard CHECKPOINT \
        --tensor-parallel T --expert-parallel E [--output RUN_DIR]

CHECKPOINT is a training run directory, its ``checkpoints/`` directory, a ``checkpoints/step_*``
directory or (consolidated, hf) a consolidated directory. Every conversion checks itself by
comparing the logits of the source and the converted model (``--no-verify`` skips that) and
writes its output under a temporary name, renamed only when everything succeeded: a failed
conversion leaves nothing behind. ``OUT/conversion.json`` records what was done and checked.

``reshard`` needs no tensor rewriting (training checkpoints store global tensors, see
``checkpoint/training.py``): it loads the checkpoint at the target layout, compares its logits
with the same model at TP = EP = 1, checks that every Adam moment a resume needs is present, and
with ``--output`` writes a run directory (the checkpoint and a config at the target layout)
from which ``pretrain/pretrain_vqmoe.py --config RUN_DIR/config.yaml`` continues training.
"""

from __future__ import annotations

from vqmoe_megatron.interrupt import guard_startup, run

if __name__ == "__main__":
    guard_startup()  # Ctrl-C during the imports below: one line, exit 130

import argparse
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from vqmoe_megatron.config import ROUTING_MODES
from vqmoe_megatron.console import fail, quiet_third_party_warnings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqmoe-convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("checkpoint", type=Path, help="run dir, checkpoints/, step dir")
    common.add_argument("--no-verify", action="store_true", help="skip the logits comparison")
    common.add_argument(
        "--tolerance", type=float, default=None, help="max |logit difference| accepted"
    )
    common.add_argument(
        "--tokenizer", type=Path, default=None, help="sentencepiece model (default: the run's)"
    )
    layout = argparse.ArgumentParser(add_help=False)
    layout.add_argument("--tensor-parallel", type=int, default=1)
    layout.add_argument("--expert-parallel", type=int, default=1)

    cons = sub.add_parser(
        "consolidated",
        parents=[common, layout],
        help="one safetensors file of full fp32 tensors + config.yaml (+ tokenizer.model)",
    )
    cons.add_argument("output", type=Path)
    hf = sub.add_parser("hf", parents=[common], help="Hugging Face directory (trust_remote_code)")
    hf.add_argument("output", type=Path)
    hf.add_argument("--routing", choices=ROUTING_MODES, default=None)
    reshard = sub.add_parser(
        "reshard",
        parents=[common, layout],
        help="check (and with --output copy) a training checkpoint at another TP/EP layout",
    )
    reshard.add_argument("--output", type=Path, default=None, help="new run directory")
    return parser


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _staging(out: Path) -> Path:
    """The temporary sibling of ``out`` written first (rank 0 creates it)."""
    out = Path(out)
    if out.exists():
        from vqmoe_megatron.checkpoint.errors import CheckpointError

        raise CheckpointError(f"{out} already exists; remove it or choose another output")
    staging = out.parent / f".{out.name}.partial"
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
        except OSError as exc:
            from vqmoe_megatron.checkpoint.errors import CheckpointError

            raise CheckpointError(
                f"cannot create the output {out} ({exc.strerror}: {exc.filename}); choose a "
                "writable directory"
            ) from exc
    _barrier()
    return staging


def _write_output(out: Path, write: Callable[[Path], dict]) -> dict:
    """Run ``write(staging)`` (collective) and move the finished output to ``out`` with its
    ``conversion.json`` (the record, and the size of every file for the consumers' integrity
    check); on any failure the staging directory is removed."""
    from vqmoe_megatron.checkpoint.files import record_files

    staging = _staging(out)
    try:
        record = write(staging)
        if _rank() == 0:
            record["files"] = record_files(staging)
            (staging / "conversion.json").write_text(json.dumps(record, indent=2) + "\n", "utf-8")
            staging.rename(out)
        _barrier()
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def _tolerance(args: argparse.Namespace) -> float:
    from vqmoe_megatron.convert.verify import DEFAULT_TOLERANCE

    return DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance


def _verified(diff: Optional[float], probes: torch.Tensor) -> Optional[dict]:
    if diff is None:
        return None
    return {"max_abs_logit_diff": diff, "sequences": probes.shape[0], "tokens": probes.numel()}


def run_consolidated(args: argparse.Namespace) -> dict:
    """Load at (TP, EP), write the consolidated directory, reload it and compare logits."""
    from vqmoe_megatron.checkpoint.consolidated import write_consolidated
    from vqmoe_megatron.convert.source import load_model, open_source, probe_tokens, with_layout
    from vqmoe_megatron.convert.verify import compare_logits, project_logits
    from vqmoe_megatron.distributed import init_distributed

    source = open_source(args.checkpoint, args.tokenizer)
    cfg = with_layout(source.cfg, args.tensor_parallel, args.expert_parallel)
    init_distributed(args.tensor_parallel, args.expert_parallel)
    gpt = load_model(source, cfg)
    tokenizer = source.tokenizer.path if source.tokenizer is not None else None
    probes = probe_tokens(source)

    def write(staging: Path) -> dict:
        write_consolidated(gpt, source.cfg, staging, tokenizer)
        diff = None
        if not args.no_verify:
            reloaded = load_model(source, cfg, weights=staging)
            diff = compare_logits(
                project_logits(gpt, probes),
                project_logits(reloaded, probes),
                _tolerance(args),
                f"consolidated {args.output}",
            )
        return {
            "kind": "consolidated",
            "source": source.description,
            "layout": {
                "tensor_parallel": args.tensor_parallel,
                "expert_parallel": args.expert_parallel,
            },
            "tokenizer": str(tokenizer) if tokenizer else None,
            "verified": _verified(diff, probes),
        }

    return _write_output(args.output, write)


def run_hf(args: argparse.Namespace) -> dict:
    """Load the source in one process, write the HF directory, reload it with transformers."""
    from vqmoe_megatron.checkpoint.consolidated import full_state_dict
    from vqmoe_megatron.convert.hf import check_exportable, load_hf, write_hf
    from vqmoe_megatron.convert.source import load_model, open_source, probe_tokens, with_layout
    from vqmoe_megatron.convert.verify import compare_logits, project_logits
    from vqmoe_megatron.distributed import init_distributed

    layout = init_distributed(1, 1)
    if layout.world_size > 1:
        raise ValueError("run the hf export as one process (it needs the whole model anyway)")
    source = open_source(args.checkpoint, args.tokenizer, require_tokenizer=True)
    check_exportable(source.cfg)
    routing = args.routing or source.cfg.moe.routing_mode
    cfg = with_layout(source.cfg, 1, 1, routing)
    gpt = load_model(source, cfg)
    tensors = full_state_dict(gpt)
    probes = probe_tokens(source)

    def write(staging: Path) -> dict:
        write_hf(tensors, cfg, source.tokenizer, staging)
        diff = None
        if not args.no_verify:
            with torch.no_grad():
                logits = load_hf(staging)(probes, use_cache=False).logits
            diff = compare_logits(
                project_logits(gpt, probes), logits, _tolerance(args), f"hf {args.output}"
            )
        return {
            "kind": "hf",
            "source": source.description,
            "routing": routing,
            "verified": _verified(diff, probes),
        }

    return _write_output(args.output, write)


def _write_run(step_dir: Path, cfg, staging: Path, output: Path) -> None:
    """Copy the checkpoint into ``staging`` as the run directory ``output`` at ``cfg``'s layout."""
    from vqmoe_megatron.checkpoint.training import LATEST, CheckpointManager
    from vqmoe_megatron.config import dump_yaml

    run_cfg = replace(cfg, train=replace(cfg.train, output_dir=str(output)))
    target = staging / "checkpoints" / step_dir.name
    shutil.copytree(step_dir, target)
    dump_yaml(run_cfg, target / "config.yaml")
    CheckpointManager.write_state(target, CheckpointManager.read_state(target))
    dump_yaml(run_cfg, staging / "config.yaml")
    (staging / "checkpoints" / LATEST).write_text(step_dir.name, "utf-8")


def run_reshard(args: argparse.Namespace) -> dict:
    """Logits at TP = EP = 1 vs at the target layout; Adam moments present; optional copy."""
    from vqmoe_megatron.checkpoint.errors import CheckpointError
    from vqmoe_megatron.checkpoint.opened import TRAINING
    from vqmoe_megatron.checkpoint.training import missing_optimizer_state
    from vqmoe_megatron.convert.source import load_model, open_source, probe_tokens, with_layout
    from vqmoe_megatron.convert.verify import compare_logits, project_logits
    from vqmoe_megatron.distributed import init_distributed

    source = open_source(args.checkpoint, args.tokenizer)
    if source.checkpoint.kind != TRAINING:
        raise CheckpointError(
            f"{args.checkpoint} is a {source.checkpoint.kind} directory (weights only); training "
            "resumes from training checkpoints, which load at any layout as they are"
        )
    step_dir = source.checkpoint.path
    cfg = with_layout(source.cfg, args.tensor_parallel, args.expert_parallel)
    seed = source.cfg.train.seed
    probes = probe_tokens(source)
    reference = None
    if not args.no_verify:
        init_distributed(1, 1, seed=seed)
        reference = project_logits(load_model(source, with_layout(source.cfg, 1, 1)), probes)
    layout = init_distributed(args.tensor_parallel, args.expert_parallel, seed=seed)
    gpt = load_model(source, cfg)
    missing = missing_optimizer_state(gpt, step_dir)
    if missing:
        raise CheckpointError(
            f"{step_dir} lacks {len(missing)} optimizer tensors a resume needs, e.g. {missing[:3]}"
        )
    diff = None
    if reference is not None:
        diff = compare_logits(
            reference,
            project_logits(gpt, probes),
            _tolerance(args),
            f"{step_dir} at TP={args.tensor_parallel} EP={args.expert_parallel}",
        )
    record = {
        "kind": "reshard",
        "source": str(step_dir),
        "layout": {
            "world_size": layout.world_size,
            "tensor_parallel": layout.tensor_parallel,
            "expert_parallel": layout.expert_parallel,
            "data_parallel": layout.data_parallel,
        },
        "verified": _verified(diff, probes),
    }
    if args.output is None:
        return record

    def write(staging: Path) -> dict:
        if _rank() == 0:
            _write_run(step_dir, cfg, staging, args.output)
        return record

    return _write_output(args.output, write)


COMMANDS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "consolidated": run_consolidated,
    "hf": run_hf,
    "reshard": run_reshard,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``vqmoe-convert``; returns the exit code (2 with one ``error:`` line)."""
    quiet_third_party_warnings()
    args = _parser().parse_args(argv)
    from vqmoe_megatron.checkpoint.errors import CheckpointError
    from vqmoe_megatron.config import ConfigError
    from vqmoe_megatron.convert.verify import VerificationError
    from vqmoe_megatron.data import DataError
    from vqmoe_megatron.distributed import destroy_distributed

    output = getattr(args, "output", None)
    if output is not None and output.exists():
        return fail(f"{output} already exists; remove it or choose another output")
    blocker = next((p for p in (output.parents if output else ()) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        return fail(f"cannot create the output {output}: {blocker} is a file, not a directory")
    if min(getattr(args, "tensor_parallel", 1), getattr(args, "expert_parallel", 1)) < 1:
        return fail("--tensor-parallel and --expert-parallel must be at least 1")
    try:
        record = COMMANDS[args.command](args)
        rank = _rank()
    except (CheckpointError, VerificationError, ConfigError, DataError, ValueError) as exc:
        return fail(str(exc))
    except OSError as exc:  # a full disk or a vanished file while writing the output
        return fail(f"cannot write {output}: {exc.strerror or exc} ({exc.filename})")
    finally:
        destroy_distributed()
    if rank == 0:
        verified = record["verified"]
        check = (
            f"verified: max |logit difference| {verified['max_abs_logit_diff']:.3g} over "
            f"{verified['sequences']} sequences"
            if verified
            else "not verified (--no-verify)"
        )
        print(f"{args.command}: {record['source']} -> {output or 'checked only'}; {check}")
    return 0


if __name__ == "__main__":
    run(main)
