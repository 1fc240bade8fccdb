"""The experts' sparse mixture as PyTorch custom ops (the portable path: CPU, and CUDA without Triton).

``experts_torch(xt, gates, expert_index, keep, w1, b1, w2, b2, scale)`` returns ``mixed``, ``order`` and ``ends``:

- ``xt`` (N, C): tokens, one row per voxel; ``gates``, ``expert_index`` (N, k): the router's choice;
- rows are the (token, slot) pairs ``p = t * k + j``, sorted by expert (stable): ``order`` (N k,) holds the pair of
  each sorted row and ``ends`` (E,) the cumulative row count per expert (``grouped_mm``'s ``offs``);
- ``keep`` (N k, C) bool or None: the experts' Dropout mask, by sorted row; ``scale`` = 1 / (1 - p);
- ``mixed[t] = sum_j gates[t, j] * keep * scale * E_{expert_index[t, j]}(xt[t])`` with
  ``E_e(h) = relu(h W1_e + b1_e) W2_e + b2_e``.

No atomics: each token has exactly ``k`` rows, so results are written to their pair's row (a permutation) and
summed over ``j``. The hidden activations (N k, 4C) are not kept for backward; backward recomputes them.

Two implementations behind one op:

- CUDA, bf16, widths a multiple of 8: ``torch.nn.functional.grouped_mm`` over all rows (no host sync);
- otherwise (CPU): expert by expert, in chunks of rows small enough that the hidden tile stays in cache, with
  ``addmm`` (bias fused). The chunk loop reads the row counts on the host, which costs nothing on CPU; the op is
  opaque to ``torch.compile``, so the loop does not break graphs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# rows per chunk of the CPU loop: the hidden tile (rows x 4C floats) stays within ~1 MiB
_CHUNK_BYTES = 1 << 20


def sort_rows(expert_index: Tensor, num_experts: int) -> Tuple[Tensor, Tensor]:
    """``order`` (pair index of each row, rows grouped by expert, stable) and ``ends`` (E,) int32.

    The keys are sorted as 8-bit integers where they fit (one radix pass on CUDA instead of eight)."""
    key_dtype = torch.uint8 if num_experts <= 256 else torch.int32
    keys = expert_index.reshape(-1).to(key_dtype)
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.arange(num_experts, device=keys.device, dtype=key_dtype)
    ends = torch.searchsorted(sorted_keys, bounds, right=True, out_int32=True)
    return order, ends


def _use_grouped_mm(xt: Tensor, hidden: int) -> bool:
    return xt.is_cuda and xt.dtype == torch.bfloat16 and xt.shape[1] % 8 == 0 and hidden % 8 == 0


def _chunks(ends: Tensor, hidden: int):
    """(expert, first row, end row) of each chunk, from the row counts read on the host."""
    rows = max(64, _CHUNK_BYTES // (4 * hidden))
    start = 0
    for e, end in enumerate(ends.tolist()):
        for r0 in range(start, end, rows):
            yield e, r0, min(r0 + rows, end)
        start = end


# ------------------------------------------------------------------------------------------------------ forward
def _forward_loop(xt, gates, keep, w1, b1, w2, b2, scale, order, ends, k):
    n, c = xt.shape
    dtype = xt.dtype
    tok = order // k
    row_gate = gates.reshape(-1).to(dtype).index_select(0, order)
    if keep is None:
        row_scale = row_gate[:, None]
    out = xt.new_empty(n * k, c)  # by pair
    for e, r0, r1 in _chunks(ends, w1.shape[2]):
        xc = xt.index_select(0, tok[r0:r1])
        h = torch.addmm(b1[e].to(dtype), xc, w1[e].to(dtype)).relu_()
        y = torch.addmm(b2[e].to(dtype), h, w2[e].to(dtype))
        if keep is None:
            y.mul_(row_scale[r0:r1])
        else:
            y.mul_(keep[r0:r1]).mul_(row_gate[r0:r1, None] * scale)
        out.index_copy_(0, order[r0:r1], y)
    return out.view(n, k, c).sum(1)


def _forward_grouped(xt, gates, keep, w1, b1, w2, b2, scale, order, ends, k):
    n, c = xt.shape
    dtype = xt.dtype
    expert_of_row = torch.searchsorted(ends, torch.arange(n * k, device=xt.device, dtype=torch.int32), right=True)
    xs = xt.index_select(0, order // k)
    h = F.grouped_mm(xs, w1.to(dtype), offs=ends).add_(b1.to(dtype).index_select(0, expert_of_row)).relu_()
    y = F.grouped_mm(h, w2.to(dtype), offs=ends).add_(b2.to(dtype).index_select(0, expert_of_row))
    row_scale = gates.reshape(-1).to(dtype).index_select(0, order)[:, None]
    if keep is not None:
        row_scale = torch.where(keep, row_scale * scale, 0.0)
    out = torch.empty_like(y).index_copy_(0, order, y.mul_(row_scale))
    return out.view(n, k, c).sum(1)


@torch.library.custom_op("nnunet_dmoe::experts_torch", mutates_args=())
def experts_torch(xt: Tensor, gates: Tensor, expert_index: Tensor, keep: Optional[Tensor], w1: Tensor, b1: Tensor,
                  w2: Tensor, b2: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    k = expert_index.shape[1]
    order, ends = sort_rows(expert_index, w1.shape[0])
    with torch.autocast(xt.device.type, enabled=False):
        fn = _forward_grouped if _use_grouped_mm(xt, w1.shape[2]) else _forward_loop
        mixed = fn(xt, gates, keep, w1, b1, w2, b2, scale, order, ends, k)
    return mixed, order, ends


@experts_torch.register_fake
def _(xt, gates, expert_index, keep, w1, b1, w2, b2, scale):
    m = expert_index.numel()
    return (xt.new_empty(xt.shape), xt.new_empty(m, dtype=torch.int64),
            xt.new_empty(w1.shape[0], dtype=torch.int32))


# ----------------------------------------------------------------------------------------------------- backward
def _add_mm(out: Tensor, a: Tensor, b: Tensor):
    # out += a @ b, accumulating low-precision products in the parameters' float32
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.add_(a @ b)


def _backward_loop(dmixed, xt, gates, keep, w1, b1, w2, b2, scale, order, ends, k):
    n, c = xt.shape
    dtype = xt.dtype
    tok = order // k
    row_gate = gates.reshape(-1).to(dtype).index_select(0, order)
    dw1, db1, dw2, db2 = (torch.zeros_like(w) for w in (w1, b1, w2, b2))
    dx = xt.new_empty(n * k, c)  # by pair
    dgate = xt.new_empty(n * k)
    for e, r0, r1 in _chunks(ends, w1.shape[2]):
        t = tok[r0:r1]
        w1e, w2e = w1[e].to(dtype), w2[e].to(dtype)
        xc = xt.index_select(0, t)
        h = torch.addmm(b1[e].to(dtype), xc, w1e).relu_()
        dy_raw = dmixed.index_select(0, t)  # gradient of the expert output before the gate
        if keep is not None:
            dy_raw.mul_(keep[r0:r1]).mul_(scale)
        g = dy_raw @ w2e.t()  # (rows, H)
        # d gate = <dy_raw, h W2 + b2>, without forming h W2: sum_h h * (dy_raw W2^T) + dy_raw . b2
        dg = torch.addmv((h * g).sum(1), dy_raw, b2[e].to(dtype))
        gate = row_gate[r0:r1, None]
        dh = torch.ops.aten.threshold_backward(g.mul_(gate), h, 0)
        dy = dy_raw.mul_(gate)
        _add_mm(dw2[e], h.t(), dy)
        db2[e].add_(dy.sum(0))
        _add_mm(dw1[e], xc.t(), dh)
        db1[e].add_(dh.sum(0))
        dx.index_copy_(0, order[r0:r1], dh @ w1e.t())
        dgate.index_copy_(0, order[r0:r1], dg)
    return dx.view(n, k, c).sum(1), dgate.view(n, k), dw1, db1, dw2, db2


def _backward_grouped(dmixed, xt, gates, keep, w1, b1, w2, b2, scale, order, ends, k):
    n, c = xt.shape
    dtype = xt.dtype
    expert_of_row = torch.searchsorted(ends, torch.arange(n * k, device=xt.device, dtype=torch.int32), right=True)
    tok = order // k
    xs = xt.index_select(0, tok)
    w1c, w2c = w1.to(dtype), w2.to(dtype)
    h = F.grouped_mm(xs, w1c, offs=ends).add_(b1.to(dtype).index_select(0, expert_of_row)).relu_()
    dy_raw = dmixed.to(dtype).index_select(0, tok)
    if keep is not None:
        dy_raw = torch.where(keep, dy_raw * scale, 0.0)
    g = F.grouped_mm(dy_raw, w2c.transpose(1, 2), offs=ends)
    dg = (h * g).sum(1) + (dy_raw * b2.to(dtype).index_select(0, expert_of_row)).sum(1)
    gate = gates.reshape(-1).to(dtype).index_select(0, order)[:, None]
    dh = torch.ops.aten.threshold_backward(g.mul_(gate), h, 0)
    dy = dy_raw * gate
    # weight gradients grouped along the row axis, as grouped_mm's own backward computes them; biases as a row of
    # ones times the rows (allocated padded so that its row stride stays 16-byte aligned)
    ones = dy.new_ones(1, -(-n * k // 8) * 8)[:, : n * k]
    dw2 = F.grouped_mm(h.t(), dy, offs=ends)
    db2 = F.grouped_mm(ones, dy, offs=ends)[:, 0]
    dw1 = F.grouped_mm(xs.t(), dh, offs=ends)
    db1 = F.grouped_mm(ones, dh, offs=ends)[:, 0]
    dx = torch.empty_like(xs).index_copy_(0, order, F.grouped_mm(dh, w1c.transpose(1, 2), offs=ends))
    dgate = torch.empty_like(dg).index_copy_(0, order, dg)
    return (dx.view(n, k, c).sum(1), dgate.view(n, k), dw1.to(w1.dtype), db1.to(b1.dtype), dw2.to(w2.dtype),
            db2.to(b2.dtype))


@torch.library.custom_op("nnunet_dmoe::experts_torch_backward", mutates_args=())
def experts_torch_backward(dmixed: Tensor, xt: Tensor, gates: Tensor, keep: Optional[Tensor], w1: Tensor, b1: Tensor,
                           w2: Tensor, b2: Tensor, scale: float, order: Tensor,
                           ends: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    k = order.numel() // xt.shape[0]
    with torch.autocast(xt.device.type, enabled=False):
        fn = _backward_grouped if _use_grouped_mm(xt, w1.shape[2]) else _backward_loop
        dx, dgate, dw1, db1, dw2, db2 = fn(dmixed.to(xt.dtype), xt, gates, keep, w1, b1, w2, b2, scale, order, ends,
                                           k)
    return dx, dgate.to(gates.dtype), dw1, db1, dw2, db2


@experts_torch_backward.register_fake
def _(dmixed, xt, gates, keep, w1, b1, w2, b2, scale, order, ends):
    return (xt.new_empty(xt.shape), gates.new_empty(gates.shape), torch.empty_like(w1), torch.empty_like(b1),
            torch.empty_like(w2), torch.empty_like(b2))


def _setup_context(ctx, inputs, output):
    xt, gates, expert_index, keep, w1, b1, w2, b2, scale = inputs
    _, order, ends = output
    ctx.save_for_backward(xt, gates, keep, w1, b1, w2, b2, order, ends)
    ctx.scale = scale


def _backward(ctx, dmixed, _order, _ends):
    xt, gates, keep, w1, b1, w2, b2, order, ends = ctx.saved_tensors
    dx, dgate, dw1, db1, dw2, db2 = experts_torch_backward(dmixed.contiguous(), xt, gates, keep, w1, b1, w2, b2,
                                                           ctx.scale, order, ends)
    return dx, dgate, None, None, dw1, db1, dw2, db2, None


experts_torch.register_autograd(_backward, setup_context=_setup_context)


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
        rows = args[-2][0]  # both backward ops end with (order, ends); order has one entry per row
        return backward_units * 2 * rows * w1[1] * w1[2]


# recomputed layer 1, dy W2^T, both weight gradients, dh W1^T
_register_flops(torch.ops.nnunet_dmoe.experts_torch, torch.ops.nnunet_dmoe.experts_torch_backward, 5)
