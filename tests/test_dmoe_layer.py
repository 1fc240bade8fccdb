"""The dMoE layer against a straightforward dense reference, routing per level, dtypes, compile."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_dmoe.dmoe import DMoEConfig, DistributionAwareMoE, route_index_for_levels


def dense_reference(block: DistributionAwareMoE, x: torch.Tensor, gates, expert_index):
    """Every token through every expert with plain Linear algebra, then pick the routed k."""
    b, c = x.shape[:2]
    tokens = x.flatten(2).transpose(1, 2)  # b n c
    ex = block.experts
    outs = []
    for e in range(ex.num_experts):
        h = torch.relu(tokens @ ex.w1[e] + ex.b1[e])
        outs.append(h @ ex.w2[e] + ex.b2[e])
    all_out = torch.stack(outs, dim=2)  # b n e c
    picked = torch.gather(all_out, 2, expert_index[..., None].expand(-1, -1, -1, c))  # b n k c
    mixed = (picked * gates[..., None]).sum(2)
    return x + mixed.transpose(1, 2).reshape(x.shape)


def make_block(c=6, routers=4, seed=0, **kw):
    torch.manual_seed(seed)
    block = DistributionAwareMoE(c, num_experts=8, num_routers=routers, top_k=2, **kw)
    with torch.no_grad():  # non-zero routers so routing differs between levels
        block.router.w_gate.normal_()
    return block


@pytest.mark.parametrize("spatial", [(5, 7), (3, 4, 5)])
def test_sparse_matches_dense_reference(spatial):
    block = make_block().eval()
    x = torch.randn(3, 6, *spatial)
    router_index = torch.tensor([0, 2, 3])
    tokens = x.flatten(2).transpose(1, 2)
    gates, idx = block.router(tokens, router_index)
    ref = dense_reference(block, x, gates, idx)
    out = block(x, router_index)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # gradients agree too
    g = torch.randn_like(x)
    gr_ref = torch.autograd.grad((ref * g).sum(), list(block.experts.parameters()))
    gr = torch.autograd.grad((block(x, router_index) * g).sum(), list(block.experts.parameters()))
    for a, b in zip(gr, gr_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


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
    kw = dict(cfg.to_arch_kwargs(), n_stages=3)
    back = DMoEConfig.pop_from_arch_kwargs(kw)
    assert kw == {"n_stages": 3} and back == cfg and back.num_routers == 5
    assert DMoEConfig(mode="moe", num_levels=4).num_routers == 1
    with pytest.raises(ValueError, match="dmoe_top_k"):
        DMoEConfig(top_k=9)
    with pytest.raises(ValueError, match="dmoe_typo"):
        DMoEConfig.pop_from_arch_kwargs({"dmoe_typo": 1})


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
