"""The experts' sparse mixture as PyTorch custom ops (the portable path: CPU, and CUDA without Triton).

``experts_torch(xt, gates, expert_index, keep, w1, b1, w2, b2, scale)`` returns ``mixed``, ``order`` and ``ends``:

- ``xt`` (N, C): tokens, one row per voxel; ``gates``, ``expert_index`` (N, k): the router's choice;
- rows are the (token, slot) pairs ``p = t * k + j``, sorted by expert (stable): ``order`` (N k,) holds the pair of
  each sorted row and ``ends`` (E,) the cumulative row count per expert (``grouped_mm``'s ``offs``);
- ``keep`` (N k, C) bool or None: the experts' Dropout mask, by sorted row; ``scale`` = 1 / (1 - p);
- ``mixed[t] = sum_j gates[t, j] * keep * scale * E_{expert_index[t, j]}(xt[t])`` with
  ``E_e(h) = relu(h W1_e + b1_e) W2_e + b2_e``.

The hidden activations (N k, 4C) are kept for backward only when they are small (few tokens: the deep stages,
where recomputing them would mean reading the large weights again); otherwise backward recomputes them. The
pre-gate expert outputs (N k, C) are kept: the gates' gradient is their product with the incoming gradient.

- CUDA: ``torch.nn.functional.grouped_mm`` over all sorted rows, biases added by row, weight gradients as grouped
  products along the rows (``grouped_mm``'s own backward formulas). Results go to their pair's row (a
  permutation: each token has exactly ``k`` rows) and are summed over the slots, so nothing is atomic and nothing
  waits for the host. ``grouped_mm`` needs 16-byte aligned rows: other widths are zero-padded (never the case for
  nnU-Net's channel counts, multiples of 8).
- CPU: expert by expert, in chunks of about 24 MiB of hidden activations, with ``mm`` into preallocated outputs.
  Every temporary stays below glibc's largest mmap threshold (32 MiB), so it is recycled from the heap instead of
  being mapped and page-faulted anew at every step, which costs more than the arithmetic on small machines.
  The row counts are read on the host (free on CPU; the op is opaque to ``torch.compile``). Results are
  accumulated with ``index_add_`` (serial over rows on CPU: deterministic).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# CPU: rows per chunk so that the hidden tile (rows x 4C) takes about this many bytes
_CHUNK_BYTES = 24 << 20
# hidden activations up to this size are kept for backward instead of recomputed
_KEEP_HIDDEN_BYTES = 8 << 20
# tests: run the CUDA implementation (grouped GEMM over all rows) on CPU tensors
_GROUPED_ON_CPU = False


def sort_rows(expert_index: Tensor, num_experts: int) -> Tuple[Tensor, Tensor]:
    """``order`` (pair index of each row, rows grouped by expert, stable) and ``ends`` (E,) int32.

    The keys are sorted as 8-bit integers where they fit (one radix pass on CUDA instead of eight)."""
    key_dtype = torch.uint8 if num_experts <= 256 else torch.int32
    keys = expert_index.reshape(-1).to(key_dtype)
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.arange(num_experts, device=keys.device, dtype=key_dtype)
    ends = torch.searchsorted(sorted_keys, bounds, right=True, out_int32=True)
    return order, ends


def _ones_rows(like: Tensor, rows: int) -> Tensor:
    """Ones (16, rows) with a 16-byte aligned row stride, for bias gradients as grouped products (row 0 is used;
    CUDA's grouped GEMM tiles its output, so it gets a few rows rather than one)."""
    return like.new_ones(16, -(-rows // 8) * 8)[:, :rows]


def keeps_hidden(rows: int, hidden: int, dtype: torch.dtype) -> bool:
    """Whether backward gets the hidden activations from forward instead of recomputing them: when they are small
    (few tokens: the deep stages), where recomputing would mean reading the large weights once more."""
    return rows * hidden * torch.empty(0, dtype=dtype).element_size() <= _KEEP_HIDDEN_BYTES


def _row_factor(gate: Tensor, keep: Optional[Tensor], scale: float) -> Tensor:
    """What multiplies an expert's output row: its gate, and the Dropout mask and scale."""
    return gate if keep is None else torch.where(keep, gate * scale, 0.0)


# --------------------------------------------------------------------------- CUDA: grouped GEMM over all rows
def _forward_grouped(xt, gate, keep, w1, b1, w2, b2, scale, order, ends, keep_hidden):
    n, c = xt.shape
    m = order.numel()
    expert = torch.searchsorted(ends, torch.arange(m, device=xt.device, dtype=torch.int32), right=True)
    h = F.grouped_mm(xt.index_select(0, order // (m // n)), w1, offs=ends).add_(b1.index_select(0, expert)).relu_()
    y = F.grouped_mm(h, w2, offs=ends).add_(b2.index_select(0, expert))
    by_pair = torch.empty_like(y).index_copy_(0, order, y * _row_factor(gate[:, None], keep, scale))
    return by_pair.view(n, m // n, c).sum(1), y, h if keep_hidden else xt.new_empty(0)


def _backward_grouped(dmixed, xt, gate, keep, w1, b1, w2, b2, scale, order, ends, y, hidden):
    n, c = xt.shape
    m = order.numel()
    token = order // (m // n)
    xs = xt.index_select(0, token)
    if hidden.numel():
        h = hidden
    else:
        expert = torch.searchsorted(ends, torch.arange(m, device=xt.device, dtype=torch.int32), right=True)
        h = F.grouped_mm(xs, w1, offs=ends).add_(b1.index_select(0, expert)).relu_()
    dy_raw = dmixed.index_select(0, token)  # gradient of the expert output before the gate
    if keep is not None:
        dy_raw = torch.where(keep, dy_raw * scale, 0.0)
    dgate = torch.empty(m, device=xt.device, dtype=xt.dtype).index_copy_(0, order, (y * dy_raw).sum(1))
    dy = dy_raw.mul_(gate[:, None])
    dh = torch.ops.aten.threshold_backward(F.grouped_mm(dy, w2.transpose(1, 2), offs=ends), h, 0)
    ones = _ones_rows(dy, m)
    grads = [F.grouped_mm(xs.t(), dh, offs=ends), F.grouped_mm(ones, dh, offs=ends)[:, 0],
             F.grouped_mm(h.t(), dy, offs=ends), F.grouped_mm(ones, dy, offs=ends)[:, 0]]
    dx = torch.empty_like(xs).index_copy_(0, order, F.grouped_mm(dh, w1.transpose(1, 2), offs=ends))
    return dx.view(n, m // n, c).sum(1), dgate, grads


# -------------------------------------------------------------------- CPU: expert by expert, in chunks of rows
def _cpu_chunks(ends: Tensor, m: int, hidden: int, dtype: torch.dtype):
    """(expert, first row, end row): each expert's rows in chunks of about ``_CHUNK_BYTES`` of hidden activations
    (row counts read on the host: free on CPU, and the op is opaque to torch.compile)."""
    step = max(64, _CHUNK_BYTES // (torch.empty(0, dtype=dtype).element_size() * hidden))
    start = 0
    for e, end in enumerate(ends.tolist()):
        for r0 in range(start, end, step):
            yield e, r0, min(r0 + step, end)
        start = end


def _forward_loop(xt, gate, keep, w1, b1, w2, b2, scale, order, ends, keep_hidden):
    n, c = xt.shape
    m, hdim = order.numel(), w1.shape[2]
    token = order // (m // n)
    y_rows = xt.new_empty(m, c)  # pre-gate expert outputs, kept for the gates' gradient
    hidden = xt.new_empty(m, hdim) if keep_hidden else None
    mixed = xt.new_zeros(n, c)
    for e, r0, r1 in _cpu_chunks(ends, m, hdim, xt.dtype):
        h = torch.mm(xt.index_select(0, token[r0:r1]), w1[e], out=None if hidden is None else hidden[r0:r1])
        h.add_(b1[e]).relu_()
        y = torch.mm(h, w2[e], out=y_rows[r0:r1]).add_(b2[e])
        factor = _row_factor(gate[r0:r1, None], None if keep is None else keep[r0:r1], scale)
        mixed.index_add_(0, token[r0:r1], y * factor)  # serial over rows on CPU: deterministic
    return mixed, y_rows, xt.new_empty(0) if hidden is None else hidden


def _backward_loop(dmixed, xt, gate, keep, w1, b1, w2, b2, scale, order, ends, y, hidden):
    n, c = xt.shape
    m, hdim = order.numel(), w1.shape[2]
    token = order // (m // n)
    grads = [torch.empty_like(w) for w in (w1, b1, w2, b2)]
    seen = set()
    dxt = xt.new_zeros(n, c)
    dgate = xt.new_empty(m)
    for e, r0, r1 in _cpu_chunks(ends, m, hdim, xt.dtype):
        xs = xt.index_select(0, token[r0:r1])
        dy_raw = dmixed.index_select(0, token[r0:r1])  # gradient of the expert output before the gate
        if keep is not None:
            dy_raw.mul_(keep[r0:r1]).mul_(scale)
        dgate.index_copy_(0, order[r0:r1], (y[r0:r1] * dy_raw).sum(1))
        dy = dy_raw.mul_(gate[r0:r1, None])
        h = hidden[r0:r1] if hidden.numel() else torch.mm(xs, w1[e]).add_(b1[e]).relu_()
        dh = torch.ops.aten.threshold_backward(dy @ w2[e].t(), h, 0)
        chunk = (xs.t(), dh), dh, (h.t(), dy), dy
        for grad, part in zip(grads, chunk):
            if isinstance(part, tuple):  # weight: a @ b into (or onto) grad[e]
                torch.mm(*part, out=grad[e]) if e not in seen else grad[e].addmm_(*part)
            elif e not in seen:
                torch.sum(part, 0, out=grad[e])
            else:
                grad[e].add_(part.sum(0))
        seen.add(e)
        dxt.index_add_(0, token[r0:r1], dh @ w1[e].t())
    for e in set(range(w1.shape[0])) - seen:  # experts without rows: zero gradients
        for grad in grads:
            grad[e].zero_()
    return dxt, dgate, grads


def _aligned(c: int, dtype: torch.dtype) -> int:
    multiple = max(1, 16 // torch.empty(0, dtype=dtype).element_size())
    return -(-c // multiple) * multiple


def _pad_widths(xt, w1, b1, w2, b2):
    """Zero-pad channels and hidden units to grouped_mm's alignment (padded units contribute nothing)."""
    (c, h), dtype = w1.shape[1:], xt.dtype
    cp, hp = _aligned(c, dtype), _aligned(h, dtype)
    if (cp, hp) == (c, h):
        return xt, w1, b1, w2, b2
    return (F.pad(xt, (0, cp - c)), F.pad(w1, (0, hp - h, 0, cp - c)), F.pad(b1, (0, hp - h)),
            F.pad(w2, (0, cp - c, 0, hp - h)), F.pad(b2, (0, cp - c)))


@torch.library.custom_op("nnunet_dmoe::experts_torch", mutates_args=())
def experts_torch(xt: Tensor, gates: Tensor, expert_index: Tensor, keep: Optional[Tensor], w1: Tensor, b1: Tensor,
                  w2: Tensor, b2: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``mixed``, ``order``, ``ends``, and for backward the pre-gate expert outputs by sorted row (N k, C)
    and the hidden rows (N k, 4C) when small (else empty: recomputed)."""
    order, ends = sort_rows(expert_index, w1.shape[0])
    n, c = xt.shape
    with torch.autocast(xt.device.type, enabled=False):
        weights = [w.to(xt.dtype) for w in (w1, b1, w2, b2)]
        gate = gates.reshape(-1).to(xt.dtype).index_select(0, order)
        keep_hidden = keeps_hidden(order.numel(), w1.shape[2], xt.dtype)
        if xt.is_cuda or _GROUPED_ON_CPU:
            xp, *weights = _pad_widths(xt, *weights)
            if keep is not None and xp.shape[1] != c:
                keep = F.pad(keep, (0, xp.shape[1] - c))
            mixed, y, hidden = _forward_grouped(xp, gate, keep, *weights, scale, order, ends, keep_hidden)
            mixed, y = mixed[:, :c].contiguous(), y[:, :c].contiguous()
            hidden = hidden[:, : w1.shape[2]].contiguous() if keep_hidden else hidden
        else:
            mixed, y, hidden = _forward_loop(xt, gate, keep, *weights, scale, order, ends, keep_hidden)
    return mixed, order, ends, y, hidden


@experts_torch.register_fake
def _(xt, gates, expert_index, keep, w1, b1, w2, b2, scale):
    m = expert_index.numel()
    h = w1.shape[2]
    return (xt.new_empty(xt.shape), xt.new_empty(m, dtype=torch.int64), xt.new_empty(w1.shape[0], dtype=torch.int32),
            xt.new_empty(m, xt.shape[1]), xt.new_empty((m, h) if keeps_hidden(m, h, xt.dtype) else (0,)))


@torch.library.custom_op("nnunet_dmoe::experts_torch_backward", mutates_args=())
def experts_torch_backward(dmixed: Tensor, xt: Tensor, gates: Tensor, keep: Optional[Tensor], w1: Tensor, b1: Tensor,
                           w2: Tensor, b2: Tensor, scale: float, order: Tensor, ends: Tensor, y: Tensor,
                           hidden: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    (c, h), dtype = w1.shape[1:], xt.dtype
    with torch.autocast(xt.device.type, enabled=False):
        weights = [w.to(dtype) for w in (w1, b1, w2, b2)]
        gate = gates.reshape(-1).to(dtype).index_select(0, order)
        dm = dmixed.to(dtype)
        if xt.is_cuda or _GROUPED_ON_CPU:
            xp, *weights = _pad_widths(xt, *weights)
            cp, hp = weights[0].shape[1:]
            if cp != c:
                dm, y = F.pad(dm, (0, cp - c)), F.pad(y, (0, cp - c))
                keep = None if keep is None else F.pad(keep, (0, cp - c))
            if hidden.numel() and hp != h:
                hidden = F.pad(hidden, (0, hp - h))
            dx, dgate, grads = _backward_grouped(dm, xp, gate, keep, *weights, scale, order, ends, y, hidden)
            dx = dx[:, :c]
            grads = [grads[0][:, :c, :h], grads[1][:, :h], grads[2][:, :h, :c], grads[3][:, :c]]
        else:
            dx, dgate, grads = _backward_loop(dm, xt, gate, keep, *weights, scale, order, ends, y, hidden)
    return (dx.contiguous(), dgate.view(gates.shape).to(gates.dtype),
            *(g.to(w.dtype).contiguous() for g, w in zip(grads, (w1, b1, w2, b2))))


@experts_torch_backward.register_fake
def _(dmixed, xt, gates, keep, w1, b1, w2, b2, scale, order, ends, y, hidden):
    return (xt.new_empty(xt.shape), gates.new_empty(gates.shape), torch.empty_like(w1), torch.empty_like(b1),
            torch.empty_like(w2), torch.empty_like(b2))


def _setup_context(ctx, inputs, output):
    xt, gates, expert_index, keep, w1, b1, w2, b2, scale = inputs
    _, order, ends, y, hidden = output
    ctx.save_for_backward(xt, gates, keep, w1, b1, w2, b2, order, ends, y, hidden)
    ctx.scale = scale


def _backward_op(ctx, dmixed, *_):
    xt, gates, keep, w1, b1, w2, b2, order, ends, y, hidden = ctx.saved_tensors
    dx, dgate, dw1, db1, dw2, db2 = experts_torch_backward(dmixed.contiguous(), xt, gates, keep, w1, b1, w2, b2,
                                                           ctx.scale, order, ends, y, hidden)
    return dx, dgate, None, None, dw1, db1, dw2, db2, None


experts_torch.register_autograd(_backward_op, setup_context=_setup_context)


def _register_flops(forward_op, backward_op, backward_units: int):
    """FlopCounterMode formulas (2 per multiply-add): forward = both expert layers on every row; backward =
    ``backward_units`` products of the same size as one layer (recomputation included)."""
    from torch.utils.flop_counter import register_flop_formula

    def first_3d(shapes):  # w1 is the first 3-D tensor after the routing inputs in both ops' signatures
        return next(a for a in shapes if isinstance(a, (tuple, list, torch.Size)) and len(a) == 3)

    @register_flop_formula(forward_op)
    def _forward(xt_shape, gates_shape, expert_index_shape, *args, out_shape=None, **kwargs):
        w1 = first_3d(args)
        return 2 * 2 * expert_index_shape[0] * expert_index_shape[1] * w1[1] * w1[2]

    @register_flop_formula(backward_op)
    def _backward(dmixed_shape, xt_shape, gates_shape, *args, out_shape=None, **kwargs):
        w1 = first_3d(args)
        return backward_units * 2 * gates_shape[0] * gates_shape[1] * w1[1] * w1[2]


# dy W2^T, both weight gradients, dh W1^T (4); recomputed blocks add layer 1 and its output (6): counted as 5
_register_flops(torch.ops.nnunet_dmoe.experts_torch, torch.ops.nnunet_dmoe.experts_torch_backward, 5)
