"""Adaptive Gradient Clipping (Brock et al., 2021), unit-wise and batched.

For each unit i of a parameter W (an output row: a conv's output channel, a linear layer's
output unit; scalars and vectors are one unit):
``max_norm = clipping * max(||W_i||, eps)`` and, where ``||G_i|| > max_norm``,
``G_i <- G_i * max_norm / max(||G_i||, 1e-6)``.

Speed: on GPUs, one Triton kernel pass (``nfnet_hub.agc_triton``) reads weights and gradients
once and rewrites only the rows that clip, with no host sync. The torch path, for CPUs (and GPUs
without Triton), reads each once too (one row-norm reduction per matrix, or per fan-in where launches
cost more than bytes; one multi-tensor norm for all scalars and vectors), computes the clip factors
of all units in one vectorised pass, and writes only clipped units (whole tensors, in one
multi-tensor multiply, where most of their rows clip). timm's ``adaptive_clip_grad`` allocates
several full-size temporaries per tensor and rewrites every gradient.
"""
from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor, Shard

from nfnet_hub import agc_triton

__all__ = ["METHODS", "PARTITIONS", "adaptive_clip_grad_", "agc_parameters", "patch_timm"]

PARTITIONS = ("exclude_classifier", "authors")
METHODS = ("auto", "triton", "grouped", "per_tensor")


class _Plan(NamedTuple):
    """Which reduction each tensor takes. It depends on shapes alone, so weights and gradients share it."""
    vectors: list[int]  # scalars and vectors: one unit each, one multi-tensor norm for all
    singles: list[int]  # matrices of one element per row (the gains): one multi-tensor abs for all
    matrices: list[list[int]]  # other matrices: one reduction per list, over its members' stacked rows
    units: list[int]  # units (rows) per tensor


def _plan(tensors: list[torch.Tensor], grouped: bool) -> _Plan:
    vectors, singles, by_fan_in = [], [], defaultdict(list)
    for i, t in enumerate(tensors):
        fan_in = math.prod(t.shape[1:])
        if t.ndim <= 1:
            vectors.append(i)
        elif fan_in == 1:
            singles.append(i)
        else:
            by_fan_in[fan_in if grouped else i].append(i)  # ungrouped: each matrix alone
    units = [1 if t.ndim <= 1 else t.shape[0] for t in tensors]
    return _Plan(vectors, singles, list(by_fan_in.values()), units)


def _row_norms(tensors: list[torch.Tensor], plan: _Plan, sharded_vectors: list[Any]) -> torch.Tensor:
    """Unit norms of every tensor, concatenated in order: one per row of a matrix, one per scalar or vector.

    ``tensors`` are local: under FSDP2 a matrix sharded on dim 0 holds whole rows, so its unit
    norms need nothing from other ranks; a vector is one unit split across ranks, so its squared
    norm is summed over the process group given in ``sharded_vectors`` (None where not sharded).
    """
    parts: list[torch.Tensor | None] = [None] * len(tensors)
    for i, norm in zip(plan.vectors, torch._foreach_norm([tensors[i] for i in plan.vectors]) if plan.vectors else []):
        norm = norm.reshape(1)
        if sharded_vectors[i] is not None:
            square = norm.square()
            dist.all_reduce(square, group=sharded_vectors[i])
            norm = square.sqrt()
        parts[i] = norm
    for i, norm in zip(plan.singles, torch._foreach_abs([tensors[i] for i in plan.singles]) if plan.singles else []):
        parts[i] = norm.reshape(-1)
    for members in plan.matrices:
        if len(members) == 1:
            parts[members[0]] = torch.linalg.vector_norm(tensors[members[0]].flatten(1), dim=1)
            continue
        rows = [tensors[i].reshape(plan.units[i], -1) for i in members]
        norms = torch.linalg.vector_norm(torch.cat(rows), dim=1).split([plan.units[i] for i in members])
        for i, norm in zip(members, norms):
            parts[i] = norm
    return torch.cat(parts)


def _local(t: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The local shard of a DTensor (FSDP2) and, for a sharded vector, the group its unit spans."""
    if not isinstance(t, DTensor):
        return t, None
    placements = t.placements
    if any(isinstance(pl, Shard) and pl.dim != 0 for pl in placements):
        raise ValueError("AGC needs parameters sharded on dim 0 (output rows), as fully_shard does")
    group = t.device_mesh.get_group() if t.ndim <= 1 and any(isinstance(pl, Shard) for pl in placements) else None
    return t.to_local(), group


@torch.no_grad()
def adaptive_clip_grad_(parameters: Iterable[torch.Tensor] | torch.Tensor, clipping: float = 0.01,
                        eps: float = 1e-3, *, method: str = "auto") -> None:
    """Clip gradients in place, unit-wise, as the authors define AGC. Parameters without grad are skipped.

    ``method`` (all give the same result):
    ``"triton"``: one fused kernel pass (``nfnet_hub.agc_triton``): no host sync, gradients rewritten
    only where they clip; needs Triton and a GPU, and rows dense in memory.
    ``"grouped"``: torch ops; the rows of all matrices of one fan-in are copied together and reduced
    in one kernel: fewer launches for more memory traffic, the fallback on GPUs without Triton.
    ``"per_tensor"``: torch ops, one reduction per tensor: the fastest where bandwidth, not launches,
    is the limit (CPUs).
    ``"auto"`` (default): ``"triton"`` where it can run, else ``"grouped"`` on GPUs, ``"per_tensor"`` on CPUs.
    """
    if method not in METHODS:
        raise ValueError(f"unknown AGC method {method!r}: choose one of {METHODS}")
    _check_settings(clipping, eps)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = defaultdict(lambda: ([], []))
    for p in parameters:
        if isinstance(p, tuple):
            raise TypeError("adaptive_clip_grad_ takes parameters (agc_parameters(model), model.parameters()), not "
                            "(name, parameter) pairs")
        if (g := p.grad) is not None:
            weights, grads = groups[(g.device, p.dtype, g.dtype)]
            weights.append(p)
            grads.append(g)
    for weights, grads in groups.values():
        groups_of = [None] * len(weights)
        if dist.is_initialized() and any(isinstance(w, DTensor) for w in weights):  # FSDP2's shards
            weights, groups_of = zip(*map(_local, weights))
            grads = [_local(g)[0] for g in grads]
        on_cpu = grads[0].device.type == "cpu"
        fused = method == "triton" or (method == "auto" and not on_cpu)
        if fused and not any(groups_of) and agc_triton.usable(weights, grads):
            agc_triton.clip_(weights, grads, clipping, eps)
            continue
        if method == "triton":
            raise ValueError("AGC method 'triton' needs Triton, a GPU, float32/16 or bfloat16 tensors with dense rows "
                             "(contiguous or channels-last), and no vector sharded across ranks; use method='auto'")
        plan = _plan(weights, method == "grouped" or (method == "auto" and not on_cpu))
        units = plan.units
        max_norm = _row_norms(weights, plan, groups_of).float().clamp_(min=eps).mul_(clipping)
        grad_norm = _row_norms(grads, plan, groups_of).float()
        clip = grad_norm > max_norm
        clipped = clip.nonzero().flatten().tolist()  # the only host sync; usually a handful of units
        if not clipped:
            continue
        scale = (max_norm / grad_norm.clamp(min=1e-6)).to(grads[0].dtype)
        starts = [0, *itertools.accumulate(units)][:-1]
        rows_of: dict[int, list[int]] = defaultdict(list)
        tensor = 0
        for unit in clipped:
            while tensor + 1 < len(starts) and starts[tensor + 1] <= unit:
                tensor += 1
            rows_of[tensor].append(unit)
        dense = [i for i, rows in rows_of.items() if 4 * len(rows) > units[i]]
        if dense:  # many rows clipped: one multi-tensor multiply, unclipped rows by 1
            factors = torch.where(clip, scale, torch.ones_like(scale)).split(units)
            torch._foreach_mul_([grads[i] for i in dense],
                                [factors[i].reshape(-1, *([1] * (grads[i].ndim - 1))) if grads[i].ndim
                                 else factors[i].reshape(()) for i in dense])
        for i, units_clipped in rows_of.items():  # few rows clipped: write those rows only
            if i in dense:
                continue
            idx = torch.tensor(units_clipped, device=scale.device)
            rows, g = idx - starts[i], grads[i]  # indexed along dim 0: a reshape would copy a channels-last tensor
            g.index_copy_(0, rows, g.index_select(0, rows) * scale[idx].reshape(-1, *([1] * (g.ndim - 1))))


def _check_settings(clipping: float, eps: float) -> None:
    """A negative clipping flips every gradient it clips, and NaN clips none: both train on without a word."""
    if not (math.isfinite(clipping) and clipping >= 0):
        raise ValueError(f"AGC clipping={clipping!r}: a finite number >= 0 (the ratio of gradient to weight norm "
                         "allowed per unit: the authors use 0.01 at batch size 4096, more for smaller batches; 0 "
                         "clips every gradient to zero)")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"AGC eps={eps!r}: a finite number >= 0 (the least weight norm, so that units whose weights "
                         "are zero still train; the authors use 1e-3)")


def agc_parameters(model: nn.Module, partition: str = "exclude_classifier") -> list[nn.Parameter]:
    """The parameters AGC should clip.

    ``"exclude_classifier"`` (default, like timm's ``exclude_head``): everything but the final
    classifier, found by module identity through ``model.get_classifier()``, not by parameter order.
    ``"authors"``: as the authors' optimiser groups them: the classifier weight is not clipped,
    its bias is (it falls into their gains-and-biases group).
    A model wrapped by DDP or DataParallel (which share its parameters) is looked into.
    """
    if partition not in PARTITIONS:
        raise ValueError(f"unknown AGC partition {partition!r}: choose one of {PARTITIONS}")
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    if isinstance(model, FullyShardedDataParallel):
        raise ValueError("FullyShardedDataParallel (FSDP1) flattens parameters into shards that cut across units: "
                         "shard with fully_shard (FSDP2, as `nfnet-hub train --fsdp` does), whose parameters AGC "
                         "clips unit-wise")
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if head is None or not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no get_classifier(): cannot tell which parameters to exclude")
    skip = {id(p) for p in head.parameters()}
    if partition == "authors" and getattr(head, "bias", None) is not None:
        skip.discard(id(head.bias))
    return [p for p in model.parameters() if id(p) not in skip]


def _timm_compatible(parameters, clip_factor: float = 0.01, eps: float = 1e-3, norm_type: float = 2.0) -> None:
    if norm_type != 2.0:
        raise ValueError("nfnet_hub's AGC implements the L2 unit norm only")
    adaptive_clip_grad_(parameters, clipping=clip_factor, eps=eps)


def patch_timm() -> None:
    """Make timm's ``--clip-mode agc`` (``timm.utils.dispatch_clip_grad``) use this implementation."""
    import timm.utils.clip_grad

    timm.utils.clip_grad.adaptive_clip_grad = _timm_compatible
