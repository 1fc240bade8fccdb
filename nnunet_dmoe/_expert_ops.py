"""The experts' sparse mixture as PyTorch custom ops (the portable path: CPU, and CUDA without Triton).

``experts_torch(xt, gates, expert_index, keep, w1, b1, w2, b2, scale)`` returns ``mixed``, ``order`` and ``ends``:

- ``xt`` (N, C): tokens, one row per voxel; ``gates``, ``expert_index`` (N, k): the router's choice;
- rows are the (token, slot) pairs ``p = t * k + j``, sorted by expert (stable): ``order`` (N k,) holds the pair of
  each sorted row and ``ends`` (E,) the cumulative row count per expert (``grouped_mm``'s ``offs``);
- ``keep`` (N k, C) bool or None: the experts' Dropout mask, by sorted row; ``scale`` = 1 / (1 - p);
- ``mixed[t] = sum_j gates[t, j] * keep * scale * E_{expert_index[t, j]}(xt[t])`` with
  ``E_e(h) = relu(h W1_e + b1_e) W2_e + b2_e``.

Both expert layers of all experts are ``torch.nn.functional.grouped_mm`` calls over the sorted rows (the weights
as stored, biases added by row); backward recomputes the hidden activations (N k, 4C) instead of keeping them,
and takes the weight gradients as grouped products along the rows (``grouped_mm``'s own backward formulas).

- CUDA: one pass over all rows. Results go to their pair's row (a permutation: each token has exactly ``k``
  rows) and are summed over the slots, so nothing is atomic and nothing waits for the host.
- CPU: the sorted rows in fixed chunks of about 24 MiB of hidden activations (group offsets clipped to the
  chunk, so the chunks need no host values either). Every temporary stays below glibc's largest mmap threshold
  (32 MiB), so it is recycled from the heap instead of being mapped and page-faulted anew at every step, which
  costs more than the arithmetic on small machines; a block with few tokens (the deep stages) is one chunk, a
  few large operations. Results are accumulated with ``index_add_`` (serial on CPU: deterministic).

``grouped_mm`` needs 16-byte aligned rows: other widths are zero-padded (never the case for nnU-Net's channel
counts, multiples of 8).
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


def sort_rows(expert_index: Tensor, num_experts: int) -> Tuple[Tensor, Tensor]:
    """``order`` (pair index of each row, rows grouped by expert, stable) and ``ends`` (E,) int32.

    The keys are sorted as 8-bit integers where they fit (one radix pass on CUDA instead of eight)."""
    key_dtype = torch.uint8 if num_experts <= 256 else torch.int32
    keys = expert_index.reshape(-1).to(key_dtype)
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.arange(num_experts, device=keys.device, dtype=key_dtype)
    ends = torch.searchsorted(sorted_keys, bounds, right=True, out_int32=True)
    return order, ends


class _Rows:
    """Sorted rows of one call: pair, token, expert and gate of each row, and the chunks to process them in."""

    def __init__(self, xt: Tensor, gates: Tensor, order: Tensor, ends: Tensor, hidden: int):
        self.n, self.c = xt.shape
        self.m = order.numel()
        self.k = self.m // self.n
        self.order, self.ends = order, ends
        self.token = order // self.k
        self.gate = gates.reshape(-1).to(xt.dtype).index_select(0, order)[:, None]
        if xt.is_cuda:  # one chunk; biases gathered by row (no host values)
            self.chunks, self.bounds = [(0, self.m)], None
            self.expert = torch.searchsorted(ends, torch.arange(self.m, device=xt.device, dtype=torch.int32),
                                             right=True)
        else:
            step = max(64, (_CHUNK_BYTES // (xt.element_size() * hidden)) // 8 * 8)
            self.chunks = [(r0, min(r0 + step, self.m)) for r0 in range(0, self.m, step)]
            ends_host = ends.tolist()
            self.bounds = list(zip([0] + ends_host[:-1], ends_host))  # rows of each expert

    def offsets(self, r0: int, r1: int) -> Tensor:
        return (self.ends - r0).clamp_(0, r1 - r0) if (r0, r1) != (0, self.m) else self.ends

    def add_bias(self, out: Tensor, bias: Tensor, r0: int, r1: int) -> Tensor:
        """``out`` (rows r0:r1) += the bias of each row's expert: one add per expert slice on CPU, a gathered
        bias on CUDA."""
        if self.bounds is None:
            return out.add_(bias.index_select(0, self.expert[r0:r1]))
        for e, (s, t) in enumerate(self.bounds):
            s, t = max(s, r0), min(t, r1)
            if s < t:
                out[s - r0:t - r0].add_(bias[e])
        return out

    def scatter_sum(self, values: Tensor, r0: int, r1: int, out: Optional[Tensor]) -> Tensor:
        """Add rows ``r0:r1`` of a per-row result into their tokens: CPU ``index_add_``; CUDA (one chunk) written
        by pair and summed over the slots."""
        if values.is_cuda:
            by_pair = torch.empty_like(values).index_copy_(0, self.order, values)
            return by_pair.view(self.n, self.k, -1).sum(1)
        if out is None:
            out = values.new_zeros(self.n, values.shape[1])
        return out.index_add_(0, self.token[r0:r1], values)


def _ones_rows(like: Tensor, rows: int) -> Tensor:
    """Ones (r, rows) with a 16-byte aligned row stride, for bias gradients as grouped products (row 0 is used).
    CUDA's grouped GEMM gets 16 rows (its kernels tile the output), CPU's per-group fallback one."""
    return like.new_ones(16 if like.is_cuda else 1, -(-rows // 8) * 8)[:, :rows]


def keeps_hidden(rows: int, hidden: int, dtype: torch.dtype) -> bool:
    """Whether backward gets the hidden activations from forward instead of recomputing them: when they are small
    (few tokens: the deep stages), where recomputing would mean reading the large weights once more."""
    return rows * hidden * torch.empty(0, dtype=dtype).element_size() <= _KEEP_HIDDEN_BYTES


def _hidden(rows: _Rows, xs: Tensor, w1: Tensor, b1: Tensor, offs: Tensor, r0: int, r1: int) -> Tensor:
    return rows.add_bias(F.grouped_mm(xs, w1, offs=offs), b1, r0, r1).relu_()


def _forward(xt, gates, keep, w1, b1, w2, b2, scale, order, ends, keep_hidden: bool):
    rows = _Rows(xt, gates, order, ends, w1.shape[2])
    mixed, hidden = None, []
    for r0, r1 in rows.chunks:
        offs = rows.offsets(r0, r1)
        h = _hidden(rows, xt.index_select(0, rows.token[r0:r1]), w1, b1, offs, r0, r1)
        if keep_hidden:
            hidden.append(h)
        y = rows.add_bias(F.grouped_mm(h, w2, offs=offs), b2, r0, r1)
        factor = rows.gate[r0:r1]
        if keep is not None:
            factor = torch.where(keep[r0:r1], factor * scale, 0.0)
        mixed = rows.scatter_sum(y.mul_(factor), r0, r1, mixed)
    return mixed, (torch.cat(hidden) if len(hidden) > 1 else hidden[0]) if keep_hidden else xt.new_empty(0)


def _backward(dmixed, xt, gates, keep, w1, b1, w2, b2, scale, order, ends, hidden):
    """With ``hidden`` (kept from forward): d gate = sum_h h * (dy_raw W2^T) + dy_raw . b2, no weight is read twice.
    Without: the hidden rows are recomputed and d gate = <dy_raw, h W2 + b2> (one product with C outputs instead of
    three passes over 4C-wide rows), and the gate is applied before ``W2^T``."""
    rows = _Rows(xt, gates, order, ends, w1.shape[2])
    w1t, w2t = w1.transpose(1, 2), w2.transpose(1, 2)
    dgate = xt.new_empty(rows.m)
    dxt, grads = None, None
    for r0, r1 in rows.chunks:
        offs = rows.offsets(r0, r1)
        token = rows.token[r0:r1]
        gate = rows.gate[r0:r1]
        xs = xt.index_select(0, token)
        dy_raw = dmixed.index_select(0, token)  # gradient of the expert output before the gate
        if keep is not None:
            dy_raw = torch.where(keep[r0:r1], dy_raw * scale, 0.0)
        if hidden.numel():
            h = hidden[r0:r1]
            g = F.grouped_mm(dy_raw, w2t, offs=offs)  # dy_raw W2^T
            dg = (h * g).sum(1).add_(rows.add_bias(torch.zeros_like(dy_raw), b2, r0, r1).mul_(dy_raw).sum(1))
            dy = dy_raw.mul_(gate)
            dh = torch.ops.aten.threshold_backward(g.mul_(gate), h, 0)
        else:
            h = _hidden(rows, xs, w1, b1, offs, r0, r1)
            y = rows.add_bias(F.grouped_mm(h, w2, offs=offs), b2, r0, r1)
            dg = y.mul_(dy_raw).sum(1)
            dy = dy_raw.mul_(gate)
            dh = torch.ops.aten.threshold_backward(F.grouped_mm(dy, w2t, offs=offs), h, 0)
        dgate.index_copy_(0, rows.order[r0:r1], dg)
        ones = _ones_rows(dy, r1 - r0)
        chunk = [F.grouped_mm(xs.t(), dh, offs=offs), F.grouped_mm(ones, dh, offs=offs)[:, 0].contiguous(),
                 F.grouped_mm(h.t(), dy, offs=offs), F.grouped_mm(ones, dy, offs=offs)[:, 0].contiguous()]
        grads = chunk if grads is None else [a.add_(b) for a, b in zip(grads, chunk)]
        dxt = rows.scatter_sum(F.grouped_mm(dh, w1t, offs=offs), r0, r1, dxt)
    return (dxt, dgate.view(rows.n, rows.k), *(g.to(w.dtype) for g, w in zip(grads, (w1, b1, w2, b2))))


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
                  w2: Tensor, b2: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``mixed``, ``order``, ``ends`` and the hidden rows kept for backward (empty when recomputed)."""
    order, ends = sort_rows(expert_index, w1.shape[0])
    c = xt.shape[1]
    with torch.autocast(xt.device.type, enabled=False):
        xp, *weights = _pad_widths(xt, *(w.to(xt.dtype) for w in (w1, b1, w2, b2)))
        if keep is not None and xp.shape[1] != c:
            keep = F.pad(keep, (0, xp.shape[1] - c))
        keep_hidden = keeps_hidden(order.numel(), weights[0].shape[2], xt.dtype)
        mixed, hidden = _forward(xp, gates, keep, *weights, scale, order, ends, keep_hidden)
    return mixed[:, :c].contiguous(), order, ends, hidden


@experts_torch.register_fake
def _(xt, gates, expert_index, keep, w1, b1, w2, b2, scale):
    m = expert_index.numel()
    hp = _aligned(w1.shape[2], xt.dtype)
    return (xt.new_empty(xt.shape), xt.new_empty(m, dtype=torch.int64),
            xt.new_empty(w1.shape[0], dtype=torch.int32),
            xt.new_empty((m, hp) if keeps_hidden(m, hp, xt.dtype) else (0,)))


@torch.library.custom_op("nnunet_dmoe::experts_torch_backward", mutates_args=())
def experts_torch_backward(dmixed: Tensor, xt: Tensor, gates: Tensor, keep: Optional[Tensor], w1: Tensor, b1: Tensor,
                           w2: Tensor, b2: Tensor, scale: float, order: Tensor, ends: Tensor,
                           hidden: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    (c, h), dtype = w1.shape[1:], xt.dtype
    with torch.autocast(xt.device.type, enabled=False):
        xp, *weights = _pad_widths(xt, *(w.to(dtype) for w in (w1, b1, w2, b2)))
        cp = xp.shape[1]
        dm = F.pad(dmixed.to(dtype), (0, cp - c)) if cp != c else dmixed.to(dtype)
        if keep is not None and cp != c:
            keep = F.pad(keep, (0, cp - c))
        dx, dgate, dw1, db1, dw2, db2 = _backward(dm, xp, gates, keep, *weights, scale, order, ends, hidden)
    return (dx[:, :c].contiguous(), dgate.to(gates.dtype), dw1[:, :c, :h].to(w1.dtype).contiguous(),
            db1[:, :h].to(b1.dtype).contiguous(), dw2[:, :h, :c].to(w2.dtype).contiguous(),
            db2[:, :c].to(b2.dtype).contiguous())


@experts_torch_backward.register_fake
def _(dmixed, xt, gates, keep, w1, b1, w2, b2, scale, order, ends, hidden):
    return (xt.new_empty(xt.shape), gates.new_empty(gates.shape), torch.empty_like(w1), torch.empty_like(b1),
            torch.empty_like(w2), torch.empty_like(b2))


def _setup_context(ctx, inputs, output):
    xt, gates, expert_index, keep, w1, b1, w2, b2, scale = inputs
    _, order, ends, hidden = output
    ctx.save_for_backward(xt, gates, keep, w1, b1, w2, b2, order, ends, hidden)
    ctx.scale = scale


def _backward_op(ctx, dmixed, _order, _ends, _hidden):
    xt, gates, keep, w1, b1, w2, b2, order, ends, hidden = ctx.saved_tensors
    dx, dgate, dw1, db1, dw2, db2 = experts_torch_backward(dmixed.contiguous(), xt, gates, keep, w1, b1, w2, b2,
                                                           ctx.scale, order, ends, hidden)
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
