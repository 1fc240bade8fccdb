"""The dMoE layer's CUDA paths against the dense reference on a real GPU (``-m gpu``; skipped without CUDA).

Compiled Triton kernels at the channel widths of ResEnc-M (32 ... 320), fp32/fp16/bf16, train and eval; the
grouped_mm backend (bf16 grouped GEMM, and its per-expert fallback for widths that are not a multiple of 8);
``torch.compile`` (inductor, fullgraph, no recompilation) of a block with the Triton kernels inside.
Run: ``pytest -m gpu tests/test_triton_gpu.py`` (do not collect test_triton_interpret.py in the same process).
"""
import os

import pytest
import torch

from dmoe_reference import assert_close_relative, dense_reference, gradients, make_block

pytestmark = pytest.mark.gpu

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("TRITON_INTERPRET=1: the GPU tests need compiled kernels", allow_module_level=True)

DEVICE = "cuda"
# relative (Frobenius) error allowed against the fp32 reference under the same autocast; fp32 runs as tf32
TOL = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def exact_reference_matmuls():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def record_dropout(monkeypatch):
    """Keeps the expert indices and the Dropout seed (Triton) or mask (grouped_mm) each backend was given."""
    from nnunet_dmoe.method import _triton_experts, dmoe

    seen = {}
    triton_op, torch_op = _triton_experts.experts_triton, dmoe.experts_torch

    def on_triton(xt, gates, expert_index, w1, b1, w2, b2, seed, dropout):
        seen.update(backend="triton", expert_index=expert_index, seed=seed, dropout=dropout)
        return triton_op(xt, gates, expert_index, w1, b1, w2, b2, seed, dropout)

    def on_torch(xt, gates, expert_index, keep, *args):
        seen.update(backend="grouped_mm", expert_index=expert_index, keep=keep)
        return torch_op(xt, gates, expert_index, keep, *args)

    monkeypatch.setattr(_triton_experts, "experts_triton", on_triton)
    monkeypatch.setattr(dmoe, "experts_torch", on_torch)
    return seen


def keep_by_pair(seen, channels):
    from dmoe_reference import keep_rows_to_pairs
    from nnunet_dmoe.method import _triton_experts

    n, k = seen["expert_index"].shape
    if seen["backend"] == "triton":
        if seen["dropout"] == 0:
            return None
        return _triton_experts.dropout_keep_mask(seen["seed"], n * k, channels, seen["dropout"])
    if seen["keep"] is None:
        return None
    return keep_rows_to_pairs(seen["keep"], seen["expert_index"], 8)


def compare(block, backend, dtype, train, spatial, monkeypatch, batch=2):
    block = block.to(DEVICE).train(train)
    block.backend = backend
    block.router.noisy = False  # low-precision logits flip near-tied choices; noise is checked in fp32 on CPU
    c = block.dim
    x = torch.randn(batch, c, *spatial, device=DEVICE, requires_grad=True)
    r = torch.arange(batch, device=DEVICE) % block.router.w_gate.shape[0]
    seen = record_dropout(monkeypatch)
    autocast = dict(device_type="cuda", dtype=dtype, enabled=dtype != torch.float32)
    with torch.autocast(**autocast):
        got = gradients(block, x, block(x, r))
    assert seen["backend"] == backend
    with torch.autocast(**autocast):
        ref = gradients(block, x, dense_reference(block, x, r, keep_by_pair(seen, c)))
    # the grouped_mm backend computes in bf16 under any autocast
    tol = TOL[torch.bfloat16 if backend == "grouped_mm" and dtype != torch.float32 else dtype]
    assert_close_relative(got, ref, tol)


# each (width, dtype, Dropout) compiles its own kernels: a few combinations, ResEnc-M's widths and nnU-Net's fp16
@pytest.mark.parametrize("c,dtype,train", [(32, torch.float16, True), (32, torch.bfloat16, False),
                                           (32, torch.float32, True), (64, torch.float16, True),
                                           (128, torch.bfloat16, True), (320, torch.float16, True)])
def test_triton_matches_dense_reference(c, dtype, train, monkeypatch):
    spatial = (16, 16, 16) if c <= 64 else (8, 8, 8)
    compare(make_block(c=c, routers=5), "triton", dtype, train, spatial, monkeypatch)


def test_triton_empty_experts_and_unknown_router(monkeypatch):
    block = make_block(c=32, routers=5)
    with torch.no_grad():
        block.router.w_gate.zero_()
        block.router.w_gate[:, :, 2] = 0.5
        block.router.w_gate[:, :, 5] = 0.4
    block = block.to(DEVICE).train()
    block.backend = "triton"
    block.router.noisy = False
    x = (torch.rand(2, 32, 12, 12, 12, device=DEVICE) + 1).requires_grad_()
    r = torch.tensor([4, 1], device=DEVICE)
    with torch.autocast("cuda", dtype=torch.float16):
        got = gradients(block, x, block(x, r))
    idle = [0, 1, 3, 4, 6, 7]
    for name in ("experts.w1", "experts.b1", "experts.w2", "experts.b2"):
        assert got[name][idle].abs().sum() == 0 and got[name][[2, 5]].abs().sum() > 0, name


@pytest.mark.parametrize("c,dtype", [(32, torch.float16), (64, torch.bfloat16), (6, torch.float16),
                                     (32, torch.float32)])
def test_grouped_mm_matches_dense_reference(c, dtype, monkeypatch):
    # bf16 grouped GEMM for widths that are multiples of 8 under autocast; otherwise the per-expert loop
    compare(make_block(c=c, routers=3), "grouped_mm", dtype, True, (12, 12, 12), monkeypatch)


def test_compiled_block_matches_eager_without_recompiling():
    import torch._dynamo as dynamo

    dynamo.reset()
    block = make_block(c=32, routers=5).to(DEVICE)
    block.backend = "triton"
    compiled = torch.compile(block, fullgraph=True)
    dynamo.config.error_on_recompile = True
    try:
        for step in range(3):
            x = torch.randn(2, 32, 16, 16, 16, device=DEVICE, requires_grad=True)
            r = torch.tensor([step % 5, (step + 2) % 5], device=DEVICE)
            block.train()
            with torch.autocast("cuda", dtype=torch.float16):
                out = compiled(x, r)
            out.float().sum().backward()
            assert all(p.grad is not None for p in block.parameters())
            block.zero_grad(set_to_none=True)
        dynamo.config.error_on_recompile = False  # eval mode is another graph
        block.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            torch.testing.assert_close(compiled(x, r), block(x, r), rtol=2e-2, atol=2e-2)
    finally:
        dynamo.config.error_on_recompile = False
        dynamo.reset()
