"""Fused expert MLPs of the dMoE for CUDA: Triton kernels in the manner of ScatterMoE (Tan et al. 2024).

``experts_triton(xt, gates, expert_index, w1, b1, w2, b2, seed, dropout)`` computes what
:func:`nnunet_dmoe.method._expert_ops.experts_torch` computes (see there for the row/pair notation) and returns
``(mixed, order, ends)``. Rows (token, slot pairs) are sorted by expert; programs own blocks of rows of one
expert. Three kernels:

- ``_forward_kernel``: gathers a block's token rows once, ``relu(x W1 + b1)`` in slices of the hidden width, each
  slice multiplied into ``W2`` at once (the hidden activations never reach memory), adds ``b2``, applies gate and
  Dropout, and writes each row to its pair's place, slot-major ``(k, N, C)``; the ``k`` slices are then summed.
  Nothing is atomic.
- ``_backward_data_kernel``: per block, recomputes the hidden slice, the gradient of the token rows
  (``dh W1^T``, written by pair and summed over slots like the forward) and of the gates
  (``<dy, h W2 + b2> = sum(h * dy W2^T) + dy . b2``).
- ``_backward_weight_kernel``: one program per (expert, hidden slice, split of the expert's rows) recomputes the
  same slices and accumulates ``x^T dh``, ``h^T dy`` and the bias sums in registers; splits are summed after.

Dropout masks come from Philox (``tl.rand``) keyed by a per-step seed and ``pair * C + channel``, so backward
regenerates them instead of storing them. Compute in the tokens' dtype (fp16/bf16 under autocast, fp32 as tf32),
accumulate in fp32; the weights are cast to the compute dtype once per call (they are small).

``experts_triton`` is a ``torch.library.triton_op``: ``torch.compile`` sees the kernels (no graph break) and
autograd uses ``experts_triton_backward``. Under ``TRITON_INTERPRET=1`` (set before triton is imported) the
kernels run on CPU tensors in Triton's interpreter, which is how the tests check them without a GPU.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from nnunet_dmoe.method._expert_ops import _register_flops, sort_rows

__all__ = ["experts_triton", "experts_triton_backward", "kernel_config", "dropout_keep_mask"]

# Triton's interpreter multiplies bf16 operands of tl.dot as raw integers: upcast them there (tests only)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_config(c: int, h: int) -> dict:
    """Block sizes and warps of the three kernels for C channels and hidden width H (powers of two >= 16)."""
    bc = max(16, triton.next_power_of_2(c))
    bh_max = max(16, triton.next_power_of_2(h))
    if bc <= 64:
        cfg = dict(fwd=(64, 64, 4), bwd_data=(64, 32, 4), bwd_weight=(32, 128, 8))
    elif bc <= 128:
        cfg = dict(fwd=(64, 32, 4), bwd_data=(32, 32, 4), bwd_weight=(32, 64, 8))
    else:
        cfg = dict(fwd=(32, 32, 8), bwd_data=(16, 32, 8), bwd_weight=(32, 32, 8))
    # (block rows, block hidden, warps)
    return {"BC": bc, **{k: (bm, min(bh, bh_max), w) for k, (bm, bh, w) in cfg.items()}}


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _to(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 -> compute dtype, rounding to nearest even. Triton's interpreter truncates fp32 -> bf16: with
    ``EMULATE`` (interpreter and bf16) the rounding is done on the bits first."""
    if dtype == tl.float32:
        return x
    if EMULATE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _expert_block(pid, ends_ptr, E: tl.constexpr, BLOCK_E: tl.constexpr, BM: tl.constexpr):
    """Expert, first row and end row of block ``pid``; blocks never straddle two experts. Programs past the last
    block get expert E (callers clamp it and mask every row)."""
    ids = tl.arange(0, BLOCK_E)
    in_range = ids < E
    ends = tl.load(ends_ptr + ids, mask=in_range, other=0)
    starts = tl.load(ends_ptr + ids - 1, mask=in_range & (ids > 0), other=0)
    counts = tl.where(in_range, ends - starts, 0)
    blocks = (counts + BM - 1) // BM
    last_block = tl.cumsum(blocks, axis=0)  # inclusive: blocks of experts 0..e
    e = tl.sum((last_block <= pid).to(tl.int32), axis=0)
    this = ids == e
    first_block = tl.sum(tl.where(this, last_block - blocks, 0), axis=0)
    row0 = tl.sum(tl.where(this, starts, 0), axis=0) + (pid - first_block) * BM
    row_end = tl.sum(tl.where(this, ends, 0), axis=0)
    return e, row0, row_end


@triton.jit
def _load_rows(order_ptr, rows, row_mask, cols, col_mask, x_ptr, C: tl.constexpr, K: tl.constexpr):
    pair = tl.load(order_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    token = pair // K
    x = tl.load(x_ptr + token[:, None] * C + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    return pair, token, x


@triton.jit
def _keep(seed_ptr, pair, cols, C: tl.constexpr, p):
    seed = tl.load(seed_ptr)
    return tl.rand(seed, pair[:, None] * C + cols[None, :]) >= p


@triton.jit
def _forward_kernel(x_ptr, order_ptr, ends_ptr, gate_ptr, seed_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, y_ptr,
                    n_tokens, p, scale,
                    C: tl.constexpr, H: tl.constexpr, K: tl.constexpr, E: tl.constexpr, BLOCK_E: tl.constexpr,
                    BM: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr, DROPOUT: tl.constexpr,
                    UPCAST: tl.constexpr):
    e, row0, row_end = _expert_block(tl.program_id(0), ends_ptr, E, BLOCK_E, BM)
    rows = row0 + tl.arange(0, BM)
    row_mask = (rows < row_end) & (e < E)
    e = tl.minimum(e, E - 1)
    cols = tl.arange(0, BC)
    col_mask = cols < C
    pair, token, x = _load_rows(order_ptr, rows, row_mask, cols, col_mask, x_ptr, C, K)
    acc = tl.zeros((BM, BC), dtype=tl.float32)
    for h0 in range(0, H, BH):
        hid = h0 + tl.arange(0, BH)
        hid_mask = hid < H
        w1 = tl.load(w1_ptr + e * C * H + cols[:, None] * H + hid[None, :],
                     mask=col_mask[:, None] & hid_mask[None, :], other=0.0).to(x.dtype)
        b1 = tl.load(b1_ptr + e * H + hid, mask=hid_mask, other=0.0).to(tl.float32)
        h = tl.maximum(_dot(x, w1, tl.zeros((BM, BH), dtype=tl.float32), UPCAST) + b1[None, :], 0.0)
        w2 = tl.load(w2_ptr + e * H * C + hid[:, None] * C + cols[None, :],
                     mask=hid_mask[:, None] & col_mask[None, :], other=0.0).to(x.dtype)
        acc = _dot(_to(h, x.dtype, UPCAST), w2, acc, UPCAST)
    b2 = tl.load(b2_ptr + e * C + cols, mask=col_mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)
    y = (acc + b2[None, :]) * gate[:, None]
    if DROPOUT:
        y = tl.where(_keep(seed_ptr, pair, cols, C, p), y * scale, 0.0)
    dest = (pair % K) * n_tokens + token  # slot-major (K, N, C)
    tl.store(y_ptr + dest[:, None] * C + cols[None, :], _to(y, y_ptr.dtype.element_ty, UPCAST),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _backward_data_kernel(x_ptr, dmix_ptr, order_ptr, ends_ptr, gate_ptr, seed_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                          dx_ptr, dgate_ptr, n_tokens, p, scale,
                          C: tl.constexpr, H: tl.constexpr, K: tl.constexpr, E: tl.constexpr,
                          BLOCK_E: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr,
                          DROPOUT: tl.constexpr, UPCAST: tl.constexpr):
    e, row0, row_end = _expert_block(tl.program_id(0), ends_ptr, E, BLOCK_E, BM)
    rows = row0 + tl.arange(0, BM)
    row_mask = (rows < row_end) & (e < E)
    e = tl.minimum(e, E - 1)
    cols = tl.arange(0, BC)
    col_mask = cols < C
    pair, token, x = _load_rows(order_ptr, rows, row_mask, cols, col_mask, x_ptr, C, K)
    # gradient of the expert output before the gate (dropout applied), and the gate
    dy_raw = tl.load(dmix_ptr + token[:, None] * C + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                     other=0.0).to(tl.float32)
    if DROPOUT:
        dy_raw = tl.where(_keep(seed_ptr, pair, cols, C, p), dy_raw * scale, 0.0)
    gate = tl.load(gate_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)
    b2 = tl.load(b2_ptr + e * C + cols, mask=col_mask, other=0.0).to(tl.float32)
    dgate = tl.sum(dy_raw * b2[None, :], axis=1)
    dy_op = _to(dy_raw, x.dtype, UPCAST)
    dx = tl.zeros((BM, BC), dtype=tl.float32)
    for h0 in range(0, H, BH):
        hid = h0 + tl.arange(0, BH)
        hid_mask = hid < H
        w1 = tl.load(w1_ptr + e * C * H + cols[:, None] * H + hid[None, :],
                     mask=col_mask[:, None] & hid_mask[None, :], other=0.0).to(x.dtype)
        b1 = tl.load(b1_ptr + e * H + hid, mask=hid_mask, other=0.0).to(tl.float32)
        w2t = tl.load(w2_ptr + e * H * C + hid[None, :] * C + cols[:, None],
                      mask=col_mask[:, None] & hid_mask[None, :], other=0.0).to(x.dtype)  # (BC, BH) = W2^T
        h_pre = _dot(x, w1, tl.zeros((BM, BH), dtype=tl.float32), UPCAST) + b1[None, :]
        g = _dot(dy_op, w2t, tl.zeros((BM, BH), dtype=tl.float32), UPCAST)  # dy_raw W2^T
        dgate += tl.sum(tl.maximum(h_pre, 0.0) * g, axis=1)
        dh = tl.where(h_pre > 0, g * gate[:, None], 0.0)
        dx = _dot(_to(dh, x.dtype, UPCAST), tl.trans(w1), dx, UPCAST)
    dest = (pair % K) * n_tokens + token
    tl.store(dx_ptr + dest[:, None] * C + cols[None, :], _to(dx, dx_ptr.dtype.element_ty, UPCAST),
             mask=row_mask[:, None] & col_mask[None, :])
    tl.store(dgate_ptr + pair, dgate, mask=row_mask)


@triton.jit
def _backward_weight_kernel(x_ptr, dmix_ptr, order_ptr, ends_ptr, gate_ptr, seed_ptr, w1_ptr, b1_ptr, w2_ptr,
                            dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, p, scale, SPLITS,
                            C: tl.constexpr, H: tl.constexpr, K: tl.constexpr, E: tl.constexpr,
                            BM: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr, DROPOUT: tl.constexpr,
                            UPCAST: tl.constexpr):
    e = tl.program_id(0)
    h_block = tl.program_id(1)
    split = tl.program_id(2)
    end = tl.load(ends_ptr + e)
    start = tl.load(ends_ptr + tl.maximum(e - 1, 0))
    start = tl.where(e > 0, start, 0)
    n_blocks = (end - start + BM - 1) // BM
    cols = tl.arange(0, BC)
    col_mask = cols < C
    hid = h_block * BH + tl.arange(0, BH)
    hid_mask = hid < H
    w_mask = col_mask[:, None] & hid_mask[None, :]
    dt = x_ptr.dtype.element_ty
    w1 = tl.load(w1_ptr + e * C * H + cols[:, None] * H + hid[None, :], mask=w_mask, other=0.0).to(dt)
    b1 = tl.load(b1_ptr + e * H + hid, mask=hid_mask, other=0.0).to(tl.float32)
    w2t = tl.load(w2_ptr + e * H * C + hid[None, :] * C + cols[:, None], mask=w_mask, other=0.0).to(dt)
    dw1 = tl.zeros((BC, BH), dtype=tl.float32)
    dw2 = tl.zeros((BH, BC), dtype=tl.float32)
    db1 = tl.zeros((BH,), dtype=tl.float32)
    db2 = tl.zeros((BC,), dtype=tl.float32)
    for block in range(split, n_blocks, SPLITS):
        rows = start + block * BM + tl.arange(0, BM)
        row_mask = rows < end
        pair, token, x = _load_rows(order_ptr, rows, row_mask, cols, col_mask, x_ptr, C, K)
        dy_raw = tl.load(dmix_ptr + token[:, None] * C + cols[None, :],
                         mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        if DROPOUT:
            dy_raw = tl.where(_keep(seed_ptr, pair, cols, C, p), dy_raw * scale, 0.0)
        gate = tl.load(gate_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)
        h_pre = _dot(x, w1, tl.zeros((BM, BH), dtype=tl.float32), UPCAST) + b1[None, :]
        g = _dot(_to(dy_raw, dt, UPCAST), w2t, tl.zeros((BM, BH), dtype=tl.float32), UPCAST)
        dh = tl.where(h_pre > 0, g * gate[:, None], 0.0)
        dy = dy_raw * gate[:, None]
        h = tl.where(row_mask[:, None], tl.maximum(h_pre, 0.0), 0.0)
        dw1 = _dot(tl.trans(x), _to(dh, dt, UPCAST), dw1, UPCAST)
        dw2 = _dot(tl.trans(_to(h, dt, UPCAST)), _to(dy, dt, UPCAST), dw2, UPCAST)
        db1 += tl.sum(dh, axis=0)
        db2 += tl.sum(dy, axis=0)
    base = split * E + e  # partial sums of this split: (SPLITS, E, ...)
    tl.store(dw1_ptr + base * C * H + cols[:, None] * H + hid[None, :], dw1, mask=w_mask)
    tl.store(dw2_ptr + base * H * C + hid[:, None] * C + cols[None, :], dw2, mask=hid_mask[:, None] & col_mask[None, :])
    tl.store(db1_ptr + base * H + hid, db1, mask=hid_mask)
    tl.store(db2_ptr + base * C + cols, db2, mask=col_mask & (h_block == 0))


def _splits(rows: int, experts: int, bm: int) -> int:
    # enough programs to fill a GPU at the large stages, few partial sums to add at the small ones
    return max(1, min(64, rows // (experts * bm * 16)))


def _common(xt: Tensor, w1: Tensor, dropout: float):
    n, c = xt.shape
    e, _, h = w1.shape
    cfg = kernel_config(c, h)
    upcast = _INTERPRET and xt.dtype == torch.bfloat16
    scalars = dict(C=c, H=h, E=e, BC=cfg["BC"], DROPOUT=dropout > 0, UPCAST=upcast)
    return n, c, e, h, cfg, scalars


@triton_op("nnunet_dmoe::experts_triton", mutates_args=())
def experts_triton(xt: Tensor, gates: Tensor, expert_index: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                   seed: Tensor, dropout: float) -> Tuple[Tensor, Tensor, Tensor]:
    n, c, e, h, cfg, scalars = _common(xt, w1, dropout)
    k = expert_index.shape[1]
    order, ends = sort_rows(expert_index, e)
    y = xt.new_empty(k, n, c)
    bm, bh, warps = cfg["fwd"]
    grid = (triton.cdiv(n * k, bm) + e,)
    wrap_triton(_forward_kernel)[grid](
        xt, order, ends, gates, seed, w1.to(xt.dtype), b1, w2.to(xt.dtype), b2, y, n, dropout, 1.0 / (1.0 - dropout),
        K=k, BLOCK_E=triton.next_power_of_2(e), BM=bm, BH=bh, num_warps=warps, num_stages=2, **scalars)
    mixed = y[0]
    for j in range(1, k):
        mixed = mixed + y[j]
    return mixed, order, ends


@triton_op("nnunet_dmoe::experts_triton_backward", mutates_args=())
def experts_triton_backward(dmixed: Tensor, xt: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                            b2: Tensor, seed: Tensor, dropout: float, order: Tensor,
                            ends: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    n, c, e, h, cfg, scalars = _common(xt, w1, dropout)
    k = gates.shape[1]
    scale = 1.0 / (1.0 - dropout)
    w1c, w2c = w1.to(xt.dtype), w2.to(xt.dtype)  # weights in the compute dtype, read by every block
    dx = xt.new_empty(k, n, c)
    dgate = torch.empty(n, k, device=xt.device, dtype=torch.float32)
    bm, bh, warps = cfg["bwd_data"]
    wrap_triton(_backward_data_kernel)[(triton.cdiv(n * k, bm) + e,)](
        xt, dmixed, order, ends, gates, seed, w1c, b1, w2c, b2, dx, dgate, n, dropout, scale,
        K=k, BLOCK_E=triton.next_power_of_2(e), BM=bm, BH=bh, num_warps=warps, num_stages=2, **scalars)
    bm, bh, warps = cfg["bwd_weight"]
    splits = _splits(n * k, e, bm)
    f32 = dict(device=xt.device, dtype=torch.float32)
    dw1, dw2 = torch.empty(splits, *w1.shape, **f32), torch.empty(splits, *w2.shape, **f32)
    db1, db2 = torch.empty(splits, *b1.shape, **f32), torch.empty(splits, *b2.shape, **f32)
    wrap_triton(_backward_weight_kernel)[(e, triton.cdiv(h, bh), splits)](
        xt, dmixed, order, ends, gates, seed, w1c, b1, w2c, dw1, db1, dw2, db2, dropout, scale, splits,
        K=k, BM=bm, BH=bh, num_warps=warps, num_stages=2, **scalars)
    dxt = dx[0]
    for j in range(1, k):
        dxt = dxt + dx[j]
    grads = [g[0] if splits == 1 else g.sum(0) for g in (dw1, db1, dw2, db2)]
    return (dxt, dgate.to(gates.dtype), *(g.to(w.dtype) for g, w in zip(grads, (w1, b1, w2, b2))))


def _setup_context(ctx, inputs, output):
    xt, gates, expert_index, w1, b1, w2, b2, seed, dropout = inputs
    _, order, ends = output
    ctx.save_for_backward(xt, gates, w1, b1, w2, b2, seed, order, ends)
    ctx.dropout = dropout


def _backward(ctx, dmixed, _order, _ends):
    xt, gates, w1, b1, w2, b2, seed, order, ends = ctx.saved_tensors
    dx, dgate, dw1, db1, dw2, db2 = experts_triton_backward(dmixed.contiguous(), xt, gates, w1, b1, w2, b2, seed,
                                                            ctx.dropout, order, ends)
    return dx, dgate, None, dw1, db1, dw2, db2, None, None


experts_triton.register_autograd(_backward, setup_context=_setup_context)


@triton.jit
def _keep_mask_kernel(seed_ptr, out_ptr, rows, p, C: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    pair = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BC)
    keep = _keep(seed_ptr, pair.to(tl.int64), cols, C, p)
    tl.store(out_ptr + pair[:, None] * C + cols[None, :], keep.to(tl.int8),
             mask=(pair < rows)[:, None] & (cols < C)[None, :])


def dropout_keep_mask(seed: Tensor, pairs: int, channels: int, p: float) -> Tensor:
    """The Dropout mask the kernels use, (pairs, channels) bool by pair ``t * k + j`` (for tests)."""
    out = torch.empty(pairs, channels, dtype=torch.int8, device=seed.device)
    _keep_mask_kernel[(triton.cdiv(pairs, 16),)](seed, out, pairs, p, C=channels, BM=16,
                                                 BC=max(16, triton.next_power_of_2(channels)))
    return out.bool()


# data kernel: layer 1, dy W2^T, dh W1^T; weight kernel: layer 1, dy W2^T and both weight gradients
_register_flops(torch.ops.nnunet_dmoe.experts_triton, torch.ops.nnunet_dmoe.experts_triton_backward, 7)
