"""The VQMoE codebook: nearest-code assignment, VQ loss, EMA updates, k-means init, dead codes.

Shapes: ``x`` is ``[T, H]`` (tokens flattened), the codebook is ``[K, H]`` and ``codes`` is
``[T]`` (long). Distance and loss arithmetic runs in fp32 (fp64 for fp64 inputs) whatever the
training precision.

Statistics that decide future updates (EMA sums, code usage since the last dead-code check) are
buffers that stay fp32/int64 under ``module.bfloat16()`` and are part of the state dict, so a run
resumed from a checkpoint makes exactly the decisions an uninterrupted run would have made.
Restart candidates are a uniform sample of one optimizer step's tokens, drawn with a generator
seeded per step (:meth:`VectorQuantizer.begin_step`), so they need no checkpoint state.
Everything that must agree across data-parallel ranks is reduced over ``group`` (the ranks that
hold a replica of the codebook and see different tokens: tensor x data x context parallel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

MAX_RESTART_CANDIDATES = 1024
"""Token vectors per rank kept, uniformly sampled over an optimizer step, for dead-code restarts."""
MIN_EMA_COUNT = 1e-20
"""A code's EMA count below which it has seen no tokens (its vector is left as it is)."""
MAX_KMEANS_POINTS = 8192
"""Token vectors per rank used by the k-means initialisation."""


@dataclass
class CodeRestart:
    """Codes revived by a dead-code restart: ``codes`` [n] long, ``vectors`` [n, H] fp32."""

    codes: torch.Tensor
    vectors: torch.Tensor


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 activations, fp64 for fp64 ones (reference tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def _group_size(group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _all_reduce(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> None:
    if _group_size(group) > 1:
        dist.all_reduce(tensor, group=group)


def _all_gather_rows(rows: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Concatenate ``rows`` [n_r, H] of every rank in ``group`` (counts may differ)."""
    world = _group_size(group)
    if world == 1:
        return rows
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c.item()) for c in counts]
    padded = rows.new_zeros((max(counts), rows.shape[1]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)], dim=0)


def kmeans(
    points: torch.Tensor, num_codes: int, iters: int, generator: torch.Generator
) -> torch.Tensor:
    """Lloyd's k-means on ``points`` [N, H] (fp32); returns ``[num_codes, H]`` centroids.

    Centroids start at distinct random points (with replacement and a little noise when there
    are fewer points than codes); a cluster that empties keeps its previous centroid.
    """
    n = points.shape[0]
    if n >= num_codes:
        idx = torch.randperm(n, generator=generator)[:num_codes]
        centroids = points[idx].clone()
    else:
        idx = torch.randint(n, (num_codes,), generator=generator)
        noise = torch.randn(num_codes, points.shape[1], generator=generator) * 1e-3
        centroids = points[idx] + noise.to(points.device) * points.std()
    for _ in range(iters):
        assign = torch.cdist(points, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=num_codes)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled].unsqueeze(1).to(points.dtype)
    return centroids


def _largest_keys(keys: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``MAX_RESTART_CANDIDATES`` largest ``keys`` [n] and their ``rows`` [n, H]."""
    if keys.numel() <= MAX_RESTART_CANDIDATES:
        return keys, rows
    keys, keep = keys.topk(MAX_RESTART_CANDIDATES)
    return keys, rows[keep]


class _SquaredVQLoss(torch.autograd.Function):
    """``sum_t w_t (||sg(x_t) - c_k||^2 + beta ||x_t - sg(c_k)||^2)`` from ``offset = c_k - x_t``.

    The router already computed ``offset`` (without gradient) for the expert input, so the loss
    costs one reduction forward and one pass over ``[T, H]`` backward: ``-2 beta w offset`` to x,
    and to the codebook ``2 w offset`` index-added per code, i.e. x's gradient times
    ``-1 / beta``: the same numbers as autograd through the two stop-gradient terms.
    """

    @staticmethod
    def forward(ctx, x, codebook, codes, weights, offset, beta):
        ctx.save_for_backward(offset, codes, weights)
        ctx.beta = beta
        ctx.dtypes = (x.dtype, codebook.dtype)
        ctx.num_codes = codebook.shape[0]
        return (1.0 + beta) * (torch.einsum("th,th->t", offset, offset) * weights).sum()

    @staticmethod
    def backward(ctx, grad):
        offset, codes, weights = ctx.saved_tensors
        beta = ctx.beta
        want_x, want_codebook = ctx.needs_input_grad[:2]
        grad_x = grad_codebook = None
        if want_x:
            x_rows = offset * (weights * (-2.0 * beta * grad)).unsqueeze(1)
            grad_x = x_rows.to(ctx.dtypes[0])
        if want_codebook:
            if want_x and beta != 0:
                rows, scale = x_rows, -1.0 / beta
            else:
                rows, scale = offset * (weights * (2.0 * grad)).unsqueeze(1), 1.0
            summed = rows.new_zeros(ctx.num_codes, rows.shape[1]).index_add_(0, codes, rows)
            grad_codebook = (summed * scale).to(ctx.dtypes[1])
        return grad_x, grad_codebook, None, None, None, None


class VectorQuantizer(nn.Module):
    """A codebook of ``num_codes`` vectors in ``R^hidden_size`` with VQ-VAE losses.

    ``update='gradient'``: the codebook is a Parameter learned through the codebook term of the
    VQ loss (the reference code). ``update='ema'``: it is a buffer moved towards the mean of its
    assigned tokens after every optimizer step (VQ-VAE-2), and the loss only commits the tokens.
    A codebook that is not :attr:`trainable` (discrete routing freezes it by default) is neither
    moved by EMA nor restarted.
    """

    _FP32_BUFFERS = ("ema_count", "ema_sum", "step_sums")

    def __init__(
        self,
        hidden_size: int,
        num_codes: int,
        *,
        distance: str = "l2",
        commitment_cost: float = 0.25,
        init_std: float = 0.02,
        update: str = "gradient",
        ema_decay: float = 0.99,
        dead_code_threshold: float = 1e-3,
        data_init: bool = False,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        if distance not in ("l2", "cosine"):
            raise ValueError(f"distance must be 'l2' or 'cosine', got {distance!r}")
        if update not in ("gradient", "ema"):
            raise ValueError(f"codebook update must be 'gradient' or 'ema', got {update!r}")
        self.hidden_size = hidden_size
        self.num_codes = num_codes
        self.distance = distance
        self.commitment_cost = commitment_cost
        self.init_std = init_std
        self.update = update
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold

        codebook = torch.randn(num_codes, hidden_size) * init_std
        if update == "gradient":
            self.codebook = nn.Parameter(codebook)
            self.codebook.sequence_parallel = sequence_parallel
        else:
            self.register_buffer("codebook", codebook)
            # Both averages start at "no tokens seen" (see _ema_update).
            self.register_buffer("ema_count", torch.zeros(num_codes))
            self.register_buffer("ema_sum", torch.zeros(num_codes, hidden_size))
            self.ema_frozen = False
            self.register_buffer("step_sums", torch.zeros(num_codes, hidden_size), persistent=False)
        self.register_buffer("window_counts", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer(
            "step_counts", torch.zeros(num_codes, dtype=torch.long), persistent=False
        )
        self.register_buffer("needs_data_init", torch.tensor(data_init))
        self.candidates: Optional[torch.Tensor] = None
        self._candidate_keys: Optional[torch.Tensor] = None
        self._candidate_generator: Optional[torch.Generator] = None

    def _apply(self, fn, recurse: bool = True):
        """Keep the EMA statistics in fp32 when the module is cast to bf16/fp16."""
        super()._apply(fn, recurse)
        for name in self._FP32_BUFFERS:
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        if self.update == "ema" and self.codebook.dtype != torch.float32:
            self._buffers["codebook"] = self.codebook.float()
        return self

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Draw the codebook from N(0, init_std^2) with ``generator`` (layout-independent init)."""
        fresh = torch.randn(self.num_codes, self.hidden_size, generator=generator) * self.init_std
        self.codebook.copy_(fresh.to(self.codebook))
        if self.update == "ema":
            self.ema_sum.zero_()
            self.ema_count.zero_()

    @property
    def trainable(self) -> bool:
        """Whether training moves the codebook (gradient or EMA) and restarts its dead codes."""
        if self.update == "gradient":
            return self.codebook.requires_grad
        return not self.ema_frozen

    def set_trainable(self, trainable: bool) -> None:
        """Freeze (or unfreeze) the codebook; call before the optimizer is built."""
        if self.update == "gradient":
            self.codebook.requires_grad_(trainable)
        else:
            self.ema_frozen = not trainable

    @torch.no_grad()
    def l2_scores(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [K, H], bias [K]) of the linear map whose argmax is the nearest L2 code:
        argmin ||x - c||^2 = argmax 2 x.c - ||c||^2 (||x||^2 is constant per row). Detached,
        so callers may fuse it into another GEMM over x (the router's)."""
        cb = self.codebook.detach().to(dtype)
        return 2.0 * cb, -(cb * cb).sum(dim=1)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest code of every token: ``x`` [T, H] -> ``codes`` [T] (long)."""
        dtype = _compute_dtype(x)
        xf = x.detach().to(dtype)
        if self.distance == "cosine":
            cb = self.codebook.detach().to(dtype)
            scores = F.normalize(xf, dim=-1) @ F.normalize(cb, dim=-1).t()
        else:
            weight, bias = self.l2_scores(dtype)
            scores = torch.addmm(bias, xf, weight.t())
        return scores.argmax(dim=1)

    @torch.no_grad()
    def offset(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``q - x`` for the code vector q of each token, [T, H] (>= fp32), without gradient.

        Every expert-input variant stops the gradient through q (METHOD.md), so no graph is
        built here; the codebook learns through :meth:`loss`. With cosine distance the code's
        direction is placed at the token's norm, on the scale of the residual stream.
        """
        dtype = _compute_dtype(x)
        xf = x.detach().to(dtype)
        q = self.codebook[codes].to(dtype)
        if self.distance == "cosine":
            q = F.normalize(q, dim=-1) * xf.norm(dim=-1, keepdim=True)
        return q - xf

    def loss(
        self,
        x: torch.Tensor,
        codes: torch.Tensor,
        valid: Optional[torch.Tensor] = None,
        offset: Optional[torch.Tensor] = None,
        total: Optional[Union[int, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """VQ-VAE loss ``||sg(x) - c||^2 + beta ||x - sg(c)||^2``, mean over valid tokens and dims.

        ``valid`` [T] bool excludes padding tokens. ``total`` is the number of valid tokens the
        mean runs over (default: this call's); a sequence-parallel caller passes the count over
        all its ranks, so that the ranks' losses add up to the mean of the whole sequence.
        ``offset`` is :meth:`offset` if the caller has it (L2 only). With
        cosine distance both sides are unit vectors, so codes learn directions.
        """
        dtype = _compute_dtype(x)
        if total is None:
            total = x.shape[0] if valid is None else valid.sum().clamp(min=1)
        keep = x.new_ones(x.shape[0], dtype=dtype) if valid is None else valid.to(dtype)
        weights = keep / (total * x.shape[1])
        if self.distance == "l2":
            if offset is None:
                offset = self.offset(x, codes)
            return _SquaredVQLoss.apply(
                x, self.codebook, codes, weights, offset, self.commitment_cost
            )
        xf = F.normalize(x.to(dtype), dim=-1)
        cf = F.normalize(self.codebook[codes].to(dtype), dim=-1)
        per_token = ((xf.detach() - cf) ** 2).sum(dim=-1) + self.commitment_cost * (
            (xf - cf.detach()) ** 2
        ).sum(dim=-1)
        return (per_token * weights).sum()

    def begin_step(self, seed: int) -> None:
        """Seed the sampling of restart candidates for the optimizer step about to run.

        Call on every rank before the step's first forward pass with a seed derived from the
        step, so that a resumed run samples what an uninterrupted one would have sampled.
        """
        generator = torch.Generator(device=self.codebook.device)
        generator.manual_seed(seed)
        self._candidate_generator = generator

    @torch.no_grad()
    def record(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """Accumulate a micro-batch's code usage (and EMA sums) and sample restart candidates.

        ``x`` [T, H] holds the micro-batch's real (non-padding) tokens, ``codes`` [T] theirs.
        """
        self.step_counts += torch.bincount(codes, minlength=self.num_codes)
        if self.update == "ema":
            self.step_sums.index_add_(0, codes, x.detach().float())
        self._sample_candidates(x.detach())

    def _sample_candidates(self, x: torch.Tensor) -> None:
        """Keep a uniform sample, without replacement, of at most ``MAX_RESTART_CANDIDATES`` of
        all the step's tokens so far: every token draws a random key and the largest keys stay
        (priority sampling), so the sample is drawn from every micro-batch and position alike.
        """
        if self._candidate_generator is None:
            self.begin_step(0)
        keys = torch.rand(x.shape[0], generator=self._candidate_generator, device=x.device)
        keys, rows = _largest_keys(keys, x)
        rows = rows.to(torch.float32, copy=True)
        if self.candidates is not None:
            keys, rows = _largest_keys(
                torch.cat([self._candidate_keys, keys]), torch.cat([self.candidates, rows])
            )
        self.candidates, self._candidate_keys = rows, keys

    def discard_step_statistics(self) -> None:
        """Forget this step's usage and candidates (a skipped step, or a frozen codebook)."""
        self.step_counts.zero_()
        if self.update == "ema":
            self.step_sums.zero_()
        self.candidates = self._candidate_keys = None

    @torch.no_grad()
    def init_from_data(
        self,
        x: torch.Tensor,
        iters: int,
        generator: torch.Generator,
        group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        """k-means initialisation from token vectors ``x`` [T, H] of every rank in ``group``.

        Every rank runs the same k-means on the same gathered points with the same generator,
        so the codebooks agree without a broadcast.
        """
        local = x.detach().float()
        if local.shape[0] > MAX_KMEANS_POINTS:
            pick = torch.randperm(local.shape[0], generator=generator)[:MAX_KMEANS_POINTS]
            local = local[pick.to(local.device)]
        points = _all_gather_rows(local, group)
        centroids = kmeans(points.cpu(), self.num_codes, iters, generator)
        if self.distance == "cosine":
            centroids = F.normalize(centroids, dim=-1)
        self.codebook.copy_(centroids.to(self.codebook))
        if self.update == "ema":
            self.ema_sum.copy_(centroids)
            self.ema_count.fill_(1.0)
        self.needs_data_init.fill_(False)

    @torch.no_grad()
    def maintain(
        self,
        step: int,
        interval: int,
        generator: torch.Generator,
        group: Optional[dist.ProcessGroup] = None,
    ) -> Optional[CodeRestart]:
        """Fold this optimizer step's statistics in; every ``interval`` steps restart dead codes.

        Call once per optimizer step on every rank of ``group``. EMA codebooks are updated here
        directly; for a gradient-learned codebook the returned :class:`CodeRestart` must be
        written into the parameter AND the optimizer's master copy by the caller (a plain
        in-place write would be overwritten by ZeRO's fp32 master weights at the next step).
        A frozen codebook only forgets the step's statistics.
        """
        if not self.trainable:
            self.discard_step_statistics()
            return None
        counts = self.step_counts.clone()
        _all_reduce(counts, group)
        if self.update == "ema":
            sums = self.step_sums.clone()
            _all_reduce(sums, group)
            self._ema_update(counts, sums)
            self.step_sums.zero_()
        self.window_counts += counts
        self.step_counts.zero_()
        restart = None
        if interval > 0 and step % interval == 0:
            restart = self._dead_code_restart(generator, group)
            self.window_counts.zero_()
        self.candidates = self._candidate_keys = None
        return restart

    def _ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """Exponential moving averages of each code's token count and token sum; the code moves
        to their ratio, the decayed mean of its tokens.

        Both averages start at zero ("no tokens seen"; k-means and restarts set a consistent
        pseudo-count of 1), so the ratio needs no bias correction: after its first tokens a code
        sits at their mean, and a code that has seen no tokens keeps its vector. (VQ-VAE-2's
        Laplace smoothing of the counts is not used: it pulls rarely used codes towards zero.)
        """
        decay = self.ema_decay
        self.ema_count.mul_(decay).add_(counts.float(), alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
        seen = self.ema_count > MIN_EMA_COUNT
        means = self.ema_sum / self.ema_count.clamp(min=MIN_EMA_COUNT).unsqueeze(1)
        self.codebook.copy_(torch.where(seen.unsqueeze(1), means, self.codebook))

    def dead_codes(self) -> torch.Tensor:
        """Codes used by less than ``dead_code_threshold`` of their fair share in this window."""
        total = self.window_counts.sum()
        if int(total) == 0:
            return torch.zeros(0, dtype=torch.long, device=self.window_counts.device)
        fair = total.double() / self.num_codes
        return (self.window_counts.double() < self.dead_code_threshold * fair).nonzero().flatten()

    def _dead_code_restart(
        self, generator: torch.Generator, group: Optional[dist.ProcessGroup]
    ) -> Optional[CodeRestart]:
        dead = self.dead_codes()
        if dead.numel() == 0:
            return None
        # Each rank proposes distinct candidates from its own sample of the step's tokens; dead
        # code j takes the proposal of the (j mod n)-th of the n ranks that have candidates, so
        # all ranks agree and the new codes come from every rank.
        proposals, have = self._propose(dead.numel(), generator)
        world = _group_size(group)
        if world > 1:
            gathered = [torch.zeros_like(proposals) for _ in range(world)]
            dist.all_gather(gathered, proposals, group=group)
            flags = [torch.zeros_like(have) for _ in range(world)]
            dist.all_gather(flags, have, group=group)
            owners = torch.cat(flags).nonzero().flatten()
            if owners.numel() == 0:
                return None
            index = torch.arange(dead.numel(), device=proposals.device)
            proposals = torch.stack(gathered)[owners[index % owners.numel()], index]
        elif not bool(have):
            return None
        if self.update == "ema":
            self.codebook[dead] = proposals.to(self.codebook)
            self.ema_sum[dead] = proposals
            self.ema_count[dead] = 1.0
        return CodeRestart(codes=dead, vectors=proposals)

    def _propose(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` candidate rows [count, H] (distinct while there are enough) and whether this
        rank has any candidates ([1] bool; zero rows when it has none)."""
        device = self.codebook.device
        candidates = self.candidates
        if candidates is None or candidates.shape[0] == 0:
            empty = torch.zeros(count, self.hidden_size, device=device)
            return empty, torch.zeros(1, dtype=torch.bool, device=device)
        available = candidates.shape[0]
        if count <= available:
            pick = torch.randperm(available, generator=generator)[:count]
        else:
            pick = torch.randint(available, (count,), generator=generator)
        return candidates[pick.to(device)], torch.ones(1, dtype=torch.bool, device=device)
