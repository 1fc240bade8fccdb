"""The Triton expert kernels on CPU, in Triton's interpreter, against the dense reference: outputs and gradients
of inputs, weights, biases and routers; every level and the unknown router, k = 1 and 2, empty experts, several
row blocks per expert and weight-gradient splits, Dropout, fp16/bf16 autocast.

``TRITON_INTERPRET=1`` must be set before the kernels are defined, so this module sets it at import (for the
whole pytest process: it only changes how Triton kernels run, and nothing else here launches any). On a machine
with CUDA the module is skipped: tests/test_triton_gpu.py runs the compiled kernels there.
"""
import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CUDA is available: the kernels are tested compiled (test_triton_gpu.py)", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from dmoe_reference import assert_close_relative, dense_reference, gradients, make_block  # noqa: E402
from nnunet_dmoe.method import _triton_experts  # noqa: E402

if not _triton_experts._INTERPRET:
    pytest.skip("nnunet_dmoe.method._triton_experts was imported before TRITON_INTERPRET=1 was set",
                allow_module_level=True)


def record_seed(monkeypatch):
    """Wraps the Triton op to keep the expert indices and Dropout seed it was given."""
    seen = {}
    original = _triton_experts.experts_triton

    def wrapper(xt, gates, expert_index, w1, b1, w2, b2, seed, dropout):
        seen.update(expert_index=expert_index, seed=seed, dropout=dropout)
        return original(xt, gates, expert_index, w1, b1, w2, b2, seed, dropout)

    monkeypatch.setattr(_triton_experts, "experts_triton", wrapper)
    return seen


def run_both(block, x, r, monkeypatch, autocast_dtype=None):
    """(Triton block's gradients, dense reference's gradients) under the same router noise and Dropout mask."""
    seen = record_seed(monkeypatch)
    block.backend = "triton"
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        got = gradients(block, x, block(x, r))
    keep = None
    if seen["dropout"] > 0:
        n, k = seen["expert_index"].shape
        keep = _triton_experts.dropout_keep_mask(seen["seed"], n * k, block.dim, seen["dropout"])
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        ref = gradients(block, x, dense_reference(block, x, r, keep))
    return got, ref


@pytest.mark.parametrize("train", [False, True])
def test_matches_dense_reference_every_router(train, monkeypatch):
    # C = 6: channel and hidden blocks are masked (not powers of two); routers 0-3 = levels, 4 = unknown
    block = make_block(c=6, routers=5).train(train)
    x = torch.randn(5, 6, 3, 4, 5, requires_grad=True)
    got, ref = run_both(block, x, torch.tensor([0, 1, 2, 3, 4]), monkeypatch)
    assert {"x", "router.w_gate", "experts.w1", "experts.b1", "experts.w2", "experts.b2"} <= set(got)
    assert ("router.w_noise" in got) == train
    assert_close_relative(got, ref, 1e-5)


def test_top1(monkeypatch):
    block = make_block(c=16, routers=2, top_k=1).train()
    x = torch.randn(2, 16, 6, 7, requires_grad=True)
    got, ref = run_both(block, x, torch.tensor([1, 0]), monkeypatch)
    assert_close_relative(got, ref, 1e-5)


def test_empty_experts_many_blocks_and_splits(monkeypatch):
    # 2 x 48 x 48 tokens, k = 2: 9216 rows over two experts, so every expert with rows spans many row blocks and the
    # weight kernel splits them (> 1 partial sum); the other six experts get no rows and zero gradients
    block = make_block(c=16, routers=1).train()
    block.router.noisy = False  # routing fixed by the logits alone
    with torch.no_grad():
        block.router.w_gate.zero_()
        block.router.w_gate[0, :, 1] = 0.5  # logits ~12 and ~10: gates away from 0/1, the router's gradient lives
        block.router.w_gate[0, :, 6] = 0.4
    x = (torch.rand(2, 16, 48, 48) + 1).requires_grad_()
    assert _triton_experts._splits(2 * 48 * 48 * 2, 8, _triton_experts.kernel_config(16, 64)["bwd_weight"][0]) > 1
    got, ref = run_both(block, x, torch.tensor([0, 0]), monkeypatch)
    assert_close_relative(got, ref, 1e-5)
    idle = [0, 2, 3, 4, 5, 7]
    for name in ("experts.w1", "experts.b1", "experts.w2", "experts.b2"):
        assert got[name][idle].abs().sum() == 0 and got[name][[1, 6]].abs().sum() > 0, name


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_low_precision_autocast(dtype, tol, monkeypatch):
    # fp16/bf16 compute with fp32 accumulation vs the reference under the same autocast; the parameters' gradients
    # stay fp32. Dropout on, router noise off (tested in fp32 above): with noise, low-precision logits flip a few
    # near-tied top-2 choices between the two computations, which says nothing about the kernels.
    # routers without bias: a bias's gradient is a sum over every token of low-precision logit gradients, which says
    # nothing about the kernels either
    block = make_block(c=32, routers=3, router_init="zero").train()
    block.router.noisy = False
    x = torch.randn(3, 32, 6, 5, 4, requires_grad=True)
    got, ref = run_both(block, x, torch.tensor([2, 0, 1]), monkeypatch, autocast_dtype=dtype)
    assert got["out"].dtype == torch.float32 and got["experts.w1"].dtype == torch.float32
    assert_close_relative(got, ref, tol)


def test_dropout_mask_rate_and_seed():
    seed = torch.tensor([123])
    a = _triton_experts.dropout_keep_mask(seed, 2000, 48, 0.1)
    assert a.shape == (2000, 48) and abs(a.float().mean().item() - 0.9) < 0.005
    assert torch.equal(a, _triton_experts.dropout_keep_mask(seed, 2000, 48, 0.1))
    assert not torch.equal(a, _triton_experts.dropout_keep_mask(torch.tensor([124]), 2000, 48, 0.1))
