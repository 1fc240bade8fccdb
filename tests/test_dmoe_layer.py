"""The dMoE layer (PyTorch backend) against a straightforward dense reference, routing per level, dtypes, compile."""
import pytest
import torch

from dmoe_reference import assert_close_relative, dense_reference, gradients, keep_rows_to_pairs, make_block
from nnunet_dmoe.method import dmoe
from nnunet_dmoe.method.config import DMoEConfig
from nnunet_dmoe.method.routing import route_index_for_levels
from nnunet_dmoe.method.dmoe import resolve_backend


def record_torch_dropout(monkeypatch):
    """Wraps the torch backend's op to keep the expert indices and Dropout mask it was given."""
    seen = {}
    original = dmoe.experts_torch

    def wrapper(xt, gates, expert_index, keep, *args):
        seen.update(expert_index=expert_index, keep=keep)
        return original(xt, gates, expert_index, keep, *args)

    monkeypatch.setattr(dmoe, "experts_torch", wrapper)
    return seen


@pytest.mark.parametrize("spatial,c", [((5, 7), 6), ((3, 4, 5), 6), ((3, 4, 5), 8)])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("keep_hidden", [True, False])
@pytest.mark.parametrize("grouped", [False, True])
def test_sparse_matches_dense_reference(spatial, c, train, keep_hidden, grouped, monkeypatch):
    # every level and the unknown router (index 4); train: router noise and the experts' Dropout; hidden rows kept
    # for backward (small blocks) or recomputed; the CPU loop, and CUDA's grouped-GEMM implementation run on CPU
    # (C = 6 is zero-padded to grouped_mm's alignment there, C = 8 is not)
    monkeypatch.setattr("nnunet_dmoe.method._expert_ops._KEEP_HIDDEN_BYTES", 1 << 30 if keep_hidden else 0)
    monkeypatch.setattr("nnunet_dmoe.method._expert_ops._GROUPED_ON_CPU", grouped)
    block = make_block(c=c).train(train)
    x = torch.randn(5, c, *spatial, requires_grad=True)
    r = torch.tensor([0, 1, 2, 3, 4])
    seen = record_torch_dropout(monkeypatch)
    torch.manual_seed(3)
    got = gradients(block, x, block(x, r))
    keep = None
    if train:
        assert seen["keep"] is not None and seen["keep"].shape == (x[0, 0].numel() * 5 * 2, c)
        keep = keep_rows_to_pairs(seen["keep"], seen["expert_index"], 8)
    torch.manual_seed(3)
    ref = gradients(block, x, dense_reference(block, x, r, keep))
    assert set(got) == {"x", "out", "router.w_gate", "router.b_gate", "experts.w1", "experts.b1", "experts.w2",
                        "experts.b2"} | ({"router.w_noise", "router.b_noise"} if train else set())
    assert_close_relative(got, ref, 1e-5)


def test_top1_and_chunked_cpu_loop(monkeypatch):
    # k = 1 takes topk + softmax; a tiny chunk size makes every expert span several chunks of the CPU loop
    monkeypatch.setattr("nnunet_dmoe.method._expert_ops._CHUNK_BYTES", 16 * 4 * 24)
    monkeypatch.setattr("nnunet_dmoe.method._expert_ops._KEEP_HIDDEN_BYTES", 0)
    block = make_block(top_k=1).eval()
    x = torch.randn(2, 6, 9, 8, requires_grad=True)
    r = torch.tensor([2, 4])
    got = gradients(block, x, block(x, r))
    ref = gradients(block, x, dense_reference(block, x, r))
    assert_close_relative(got, ref, 1e-5)
    # softmax over one logit is constant: the router still gets a (zero) gradient, as DDP needs
    assert got["router.w_gate"].abs().sum() == 0 and got["router.b_gate"].abs().sum() == 0


def test_top2_gates_equal_softmax_of_topk():
    block = make_block().train()
    tokens = torch.randn(3, 50, 6)
    r = torch.tensor([0, 4, 2])
    torch.manual_seed(0)
    gates, index = block.router(tokens, r)
    block.router.top_k = 3  # generic path on the same noise
    torch.manual_seed(0)
    gates3, index3 = block.router(tokens, r)
    torch.testing.assert_close(index, index3[..., :2])
    torch.testing.assert_close(gates, torch.softmax(torch.log(gates3[..., :2]), -1))
    assert gates.dtype == torch.float32 and (gates[..., 0] >= gates[..., 1]).all()


def test_each_sample_uses_its_own_router():
    block = make_block().eval()
    x = torch.randn(1, 6, 4, 4, 4).repeat(4, 1, 1, 1, 1)  # the same image 4 times
    out = block(x, torch.tensor([0, 1, 2, 3]))
    # same image, different level -> different output; same level -> identical output
    assert not torch.allclose(out[0], out[1])
    out2 = block(x, torch.tensor([1, 1, 1, 1]))
    torch.testing.assert_close(out2[0], out[1])
    # a sample's result does not depend on the rest of the batch
    torch.testing.assert_close(block(x[2:3], torch.tensor([2])), out[2:3])


def test_router_picks_expected_experts():
    block = make_block(c=4, routers=2).eval()
    with torch.no_grad():
        block.router.w_gate.zero_()
        block.router.w_gate[0, :, 3] = 10.0  # router 0 prefers experts 3 and 5
        block.router.w_gate[0, :, 5] = 9.0
        block.router.w_gate[1, :, 1] = 10.0  # router 1 prefers experts 1 and 6
        block.router.w_gate[1, :, 6] = 9.0
    tokens = torch.rand(2, 10, 4) + 0.5
    gates, idx = block.router(tokens, torch.tensor([0, 1]))
    assert set(idx[0].flatten().tolist()) == {3, 5}
    assert set(idx[1].flatten().tolist()) == {1, 6}
    torch.testing.assert_close(gates.sum(-1), torch.ones(2, 10))
    assert (gates[..., 0] > gates[..., 1]).all()


def test_eval_is_deterministic_and_train_is_noisy():
    block = make_block(expert_dropout=0.0)
    x = torch.randn(2, 6, 8, 8)
    r = torch.tensor([0, 1])
    block.eval()
    torch.testing.assert_close(block(x, r), block(x, r))
    block.train()
    torch.manual_seed(1)
    a = block(x, r)
    torch.manual_seed(2)
    assert not torch.allclose(a, block(x, r))


def test_zero_last_layer_is_identity():
    block = make_block()
    with torch.no_grad():
        block.experts.w2.zero_()
        block.experts.b2.zero_()
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(block.eval()(x, torch.tensor([0, 3])), x)


def test_all_parameters_get_gradients_with_missing_levels_and_idle_experts():
    block = make_block(routers=5)
    with torch.no_grad():
        block.router.w_gate.zero_()
        block.router.w_gate[:, :, 0] = 5.0  # only experts 0 and 1 receive tokens
        block.router.w_gate[:, :, 1] = 4.0
    x = torch.rand(2, 6, 4, 4) + 1
    block(x, torch.tensor([0, 0])).sum().backward()  # levels 1..4 absent
    for name, p in block.named_parameters():
        assert p.grad is not None, name
    assert block.experts.w1.grad[5].abs().sum() == 0  # idle expert: zero, but present


def test_route_index_for_levels():
    levels = torch.tensor([0, 2, -1, 1])
    assert route_index_for_levels(levels, 3, "dmoe").tolist() == [0, 2, 3, 1]
    assert route_index_for_levels(levels, 3, "moe").tolist() == [0, 0, 0, 0]


def test_config_roundtrip_and_validation():
    cfg = DMoEConfig(num_levels=4, stages=(0, 2), attribute_channel=1)
    block = cfg.to_block()
    back = DMoEConfig.from_block(block)
    assert block["stages"] == [0, 2] and back == cfg and back.num_routers == 5
    assert DMoEConfig(mode="moe", num_levels=4).num_routers == 1
    with pytest.raises(ValueError, match="\"top_k\" in the plans' \"dmoe\" block must be in 1..num_experts=8"):
        DMoEConfig(top_k=9)
    with pytest.raises(ValueError, match=r"unknown dMoE settings .*\['typo'\]"):
        DMoEConfig.from_block({"typo": 1})
    with pytest.raises(ValueError, match="transformer_placement"):
        DMoEConfig(transformer_placement="everywhere")


def test_plans_of_version_0_1_load():
    """Version 0.1 kept the settings in arch_kwargs with the prefix dmoe_: nnunet_dmoe.plans.blocks reads them (and
    only there), drops them from the U-Net's kwargs, and gives the settings changed since their earlier values."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    from nnunet_dmoe.plans.blocks import read_dmoe_config, unet_arch_kwargs

    arch = {"n_stages": 3, "dmoe_num_levels": 4, "dmoe_attribute_channel": 1, "dmoe_num_experts": 4}
    cm = ConfigurationManager({"architecture": {"network_class_name": "x", "arch_kwargs": arch,
                                                "_kw_requires_import": []}})
    config = read_dmoe_config(cm, mode="moe")
    assert (config.num_levels, config.attribute_channel, config.num_experts, config.mode) == (4, 1, 4, "moe")
    assert (config.stages, config.router_init) == ("all", "zero")
    assert unet_arch_kwargs(cm) == {"n_stages": 3}


def test_bfloat16_autocast_cpu():
    block = make_block().eval()
    x = torch.randn(2, 6, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x.bfloat16(), torch.tensor([0, 1]))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), block(x, torch.tensor([0, 1])), rtol=5e-2, atol=5e-2)


def test_compile_does_not_recompile_per_step():
    import torch._dynamo as dynamo
    dynamo.reset()
    block = make_block()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch._dynamo.config.error_on_recompile = True
    try:
        for step in range(3):
            x = torch.randn(2, 6, 6, 6)
            r = torch.tensor([step % 4, (step + 1) % 4])
            # grouped_mm under compile is bf16-only: nnU-Net compiles on CUDA, always under autocast
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = compiled(x, r)
            out.float().sum().backward()
    finally:
        torch._dynamo.config.error_on_recompile = False
        dynamo.reset()


def test_backend_choice(monkeypatch):
    x = torch.zeros(1, 32, 2, 2)
    monkeypatch.delenv("NNUNET_DMOE_BACKEND", raising=False)
    assert resolve_backend(x, 32) == "grouped_mm"  # CPU: the PyTorch path
    assert resolve_backend(x.to("meta"), 32, "triton") == "grouped_mm"  # FLOP counting
    monkeypatch.setenv("NNUNET_DMOE_BACKEND", "fused")
    with pytest.raises(ValueError, match="fused"):
        resolve_backend(x, 32)
    monkeypatch.setenv("NNUNET_DMOE_BACKEND", "grouped_mm")
    assert resolve_backend(x, 32) == "grouped_mm"
    monkeypatch.setenv("NNUNET_DMOE_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA"):  # or "cannot be imported" where Triton is absent
        resolve_backend(x, 32)
