"""AGC in one pass over memory, for GPUs: a Triton kernel that clips the units of many tensors at once.

The units (rows) of all tensors are cut into tiles of consecutive rows of one tensor, each tile a
dense block of memory. One program per tile finds its block through a table of base pointers, reads
weights and gradients once, and rewrites only the rows that clip (read again while still in cache).
Two launches (short rows in tiles of many, the others one per program) replace the few hundred
kernels and the host sync of the torch path; the host work is a table of pointers, copied to the
device asynchronously and only when the pointers change (as they rarely do from step to step).

Rows must be dense in memory (contiguous or channels-last tensors, whose rows stay contiguous):
``usable`` says whether a parameter list qualifies. Under ``TRITON_INTERPRET=1`` the kernel also runs
on CPU tensors, which is how the tests check it without a GPU.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs of torch come without Triton
    triton = None

__all__ = ["available", "clip_", "usable"]

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class _Launch(NamedTuple):
    """Rows up to ``longest`` elements long, in tiles of ``rows`` x ``block``, with ``warps`` warps each."""
    longest: float
    rows: int
    block: int
    warps: int


# Of nine tables of tile shapes measured on an H100 (F0's 231 tensors), this one was the fastest on the
# GPU (0.19 ms, about 90% of copy bandwidth) and, with two launches, the cheapest on the host.
# Rows longer than a tile are read in a loop.
_LAUNCHES = (_Launch(32, 64, 32, 4), _Launch(math.inf, 1, 512, 2))


def available(device: torch.device) -> bool:
    """Triton is installed and can run on ``device`` (any CUDA device; the CPU only when interpreting)."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def usable(weights: list[torch.Tensor], grads: list[torch.Tensor]) -> bool:
    """Every unit of every weight and gradient is one dense run of memory, on a device Triton can use."""
    channels_last = torch.channels_last
    return (available(grads[0].device) and weights[0].dtype in _DTYPES and grads[0].dtype in _DTYPES
            and all(t.is_contiguous() or t.is_contiguous(memory_format=channels_last)
                    for t in itertools.chain(weights, grads)))


if triton is not None:
    @triton.jit
    def _clip_tiles(w_ptrs, g_ptrs, tiles, clipping, eps, W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr):
        tile = tiles + 4 * tl.program_id(0)  # (tensor, first element, rows, row length)
        tensor, start, n_rows, length = tl.load(tile), tl.load(tile + 1), tl.load(tile + 2), tl.load(tile + 3)
        rows = tl.arange(0, ROWS)
        offsets = start + rows.to(tl.int64)[:, None] * length
        w = tl.load(w_ptrs + tensor).to(tl.pointer_type(W_DTYPE)) + offsets
        g = tl.load(g_ptrs + tensor).to(tl.pointer_type(G_DTYPE)) + offsets
        cols = tl.arange(0, BLOCK)[None, :]
        live = (rows < n_rows)[:, None]
        w_sq = tl.zeros([ROWS, BLOCK], tl.float32)
        g_sq = tl.zeros([ROWS, BLOCK], tl.float32)
        for offset in range(0, length, BLOCK):
            inside = live & (cols + offset < length)
            w_tile = tl.load(w + offset + cols, mask=inside, other=0.0).to(tl.float32)
            g_tile = tl.load(g + offset + cols, mask=inside, other=0.0).to(tl.float32)
            w_sq += w_tile * w_tile
            g_sq += g_tile * g_tile
        w_norm = tl.sqrt(tl.sum(w_sq, 1))
        g_norm = tl.sqrt(tl.sum(g_sq, 1))
        max_norm = clipping * tl.maximum(w_norm, eps)
        clip = (g_norm > max_norm)[:, None]
        scale = (max_norm / tl.maximum(g_norm, 1e-6))[:, None]
        if tl.max(clip.to(tl.int32)) > 0:  # the clipped rows only, read again while still in cache
            for offset in range(0, length, BLOCK):
                inside = live & clip & (cols + offset < length)
                g_tile = tl.load(g + offset + cols, mask=inside, other=0.0).to(tl.float32)
                tl.store(g + offset + cols, (g_tile * scale).to(G_DTYPE), mask=inside)


def _tiles(shapes: list[torch.Size], device: torch.device) -> list[tuple[_Launch, torch.Tensor]]:
    """Each launch's tiles: (tensor, first element, rows, row length). Shapes alone decide them."""
    tiles: dict[_Launch, list[tuple[int, int, int, int]]] = {launch: [] for launch in _LAUNCHES}
    for i, shape in enumerate(shapes):
        units = 1 if len(shape) <= 1 else shape[0]
        length = math.prod(shape) // units if units else 0
        launch = next(launch for launch in _LAUNCHES if length <= launch.longest)
        tiles[launch].extend((i, first * length, min(launch.rows, units - first), length)
                             for first in range(0, units, launch.rows))
    return [(launch, torch.tensor(t, dtype=torch.int64).to(device)) for launch, t in tiles.items() if t]


class _Tables:
    """What one parameter list needs on the device, rebuilt only when shapes or addresses change.

    Addresses go through a pinned buffer and an asynchronous copy, so a change costs no host sync;
    the buffer is rewritten only once its last copy is done.
    """

    def __init__(self, device: torch.device):
        self.device, self.shapes, self.tiles, self.addresses = device, None, [], None
        self.launches = self.pinned = self.copied = self.pointers = None

    def update(self, shapes: list[torch.Size], addresses: list[int]) -> None:
        if shapes != self.shapes or _LAUNCHES != self.launches:
            self.shapes, self.launches, self.tiles = shapes, _LAUNCHES, _tiles(shapes, self.device)
        if addresses == self.addresses:
            return
        self.addresses = addresses
        if self.device.type != "cuda":  # Triton's interpreter reads host memory
            self.pointers = torch.tensor(addresses, dtype=torch.int64).view(2, -1)
            return
        if self.pinned is None or self.pinned.numel() != len(addresses):
            self.pinned = torch.empty(len(addresses), dtype=torch.int64, pin_memory=True)
            self.copied = torch.cuda.Event()
        self.copied.synchronize()
        self.pinned.numpy()[:] = addresses
        self.pointers = self.pinned.to(self.device, non_blocking=True).view(2, -1)
        self.copied.record()


_TABLES: dict[tuple[torch.device, int], _Tables] = {}


@torch.no_grad()
def clip_(weights: list[torch.Tensor], grads: list[torch.Tensor], clipping: float, eps: float) -> None:
    """Clip ``grads`` in place against ``weights`` (same length, one dtype each, rows dense: see ``usable``)."""
    device = grads[0].device
    w_dtype, g_dtype = (getattr(tl, _DTYPES[t.dtype]) for t in (weights[0], grads[0]))
    # Triton launches on the current device: make it the gradients' one
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if (tables := _TABLES.get((device, len(weights)))) is None:
            tables = _TABLES[device, len(weights)] = _Tables(device)
        tables.update([w.shape for w in weights], [w.data_ptr() for w in weights] + [g.data_ptr() for g in grads])
        for launch, tiles in tables.tiles:
            _clip_tiles[(tiles.shape[0],)](tables.pointers[0], tables.pointers[1], tiles, clipping, eps,
                                           W_DTYPE=w_dtype, G_DTYPE=g_dtype, ROWS=launch.rows,
                                           BLOCK=launch.block, num_warps=launch.warps)
