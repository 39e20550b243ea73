"""Worker: EMA codebook upkeep and dead-code restarts at data parallelism 2 (gloo).

Every step, each rank records its half of the step's tokens into a quantizer reduced over both
ranks, and all of them into a reference quantizer of its own (a one-rank group). Both start from
the default initialisation. The codebooks must agree (EMA steps), then a restart must give the
same codebook on both ranks, drawn from both ranks' tokens. Prints "codebook upkeep ok".
"""

import torch
import torch.distributed as dist

from vqmoe_megatron.moe import VectorQuantizer
from vqmoe_megatron.moe.layer import derived_generator

H, K = 8, 8


def step_tokens(codebook: torch.Tensor, step: int) -> torch.Tensor:
    """64 tokens around three scaled codes (five codes stay dead), the same on every rank."""
    generator = torch.Generator().manual_seed(step)
    centers = codebook[:3] * 3.0
    noise = 0.01 * torch.randn(64, H, generator=generator)
    return centers.repeat_interleave(64 // 3 + 1, dim=0)[:64] + noise


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    solo = [dist.new_group([r]) for r in range(world)][rank]
    torch.manual_seed(0)
    parallel = VectorQuantizer(H, K, update="ema", dead_code_threshold=0.01)
    torch.manual_seed(0)
    reference = VectorQuantizer(H, K, update="ema", dead_code_threshold=0.01)
    start = parallel.codebook.clone()

    for step in range(1, 10):
        tokens = step_tokens(start, step)
        for quantizer, x, group in (
            (parallel, tokens[rank::world], None),
            (reference, tokens, solo),
        ):
            quantizer.begin_step(step)
            quantizer.record(x, quantizer.assign(x))
            quantizer.maintain(step, 0, derived_generator("restart", step), group)
        torch.testing.assert_close(parallel.codebook, reference.codebook, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(parallel.codebook[3:], start[3:], rtol=0, atol=0)

    tokens = step_tokens(start, 10)
    mine = tokens[rank::world]
    parallel.begin_step(10)
    parallel.record(mine, parallel.assign(mine))
    restart = parallel.maintain(10, 10, derived_generator("restart", 10), None)
    assert restart is not None and restart.codes.tolist() == [3, 4, 5, 6, 7], restart
    codebooks = [torch.zeros_like(parallel.codebook) for _ in range(world)]
    dist.all_gather(codebooks, parallel.codebook)
    torch.testing.assert_close(codebooks[0], codebooks[1], rtol=0, atol=0)
    halves = [tokens[r::world] for r in range(world)]
    sources = set()
    for vector in restart.vectors:
        owners = [r for r, half in enumerate(halves) if (half == vector).all(dim=1).any()]
        assert owners, "a restarted vector is one of the step's tokens"
        sources.update(owners)
    assert sources == {0, 1}, sources
    dist.barrier()
    if rank == 0:
        print("codebook upkeep ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
