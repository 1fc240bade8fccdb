"""Cost report: parameter and FLOP counts against independent formulas, peak memory, the CLI."""
import json
import math
import re

import pytest
import torch

from conftest import nnunet_env, run
from nnunet_dmoe.commands.benchmark.entry_point import benchmark_entry_point
from nnunet_dmoe.commands.benchmark.flops import (count_flops, count_parameters, dmoe_flops, dmoe_parameters,
                                                  grouped_mm_flops)
from nnunet_dmoe.commands.benchmark.presets import build_pair, preset_configuration
from nnunet_dmoe.commands.benchmark.report import cost_report, format_table
from nnunet_dmoe.commands.benchmark.timing import peak_memory_bytes
from nnunet_dmoe.method.dmoe import DistributionAwareMoE

TINY_CHANNELS = (8, 16, 32)


@pytest.fixture(scope="module")
def tiny_pair():
    return build_pair(preset_configuration("tiny_3d"), num_levels=4, deep_supervision=True)


def test_parameters_added_by_dmoe_equal_the_formula(tiny_pair):
    base, moe = tiny_pair
    blocks = [m for m in moe.modules() if isinstance(m, DistributionAwareMoE)]
    assert [b.dim for b in blocks] == list(TINY_CHANNELS[1:])  # after the stages that downsample
    by_hand = sum(p.numel() for b in blocks for p in list(b.experts.parameters()) + list(b.router.parameters()))
    formula = dmoe_parameters(TINY_CHANNELS[1:], num_experts=8, ratio=4, num_routers=5, noisy=True)
    assert by_hand == formula
    assert count_parameters(moe) - count_parameters(base) == formula
    assert count_parameters(moe.unet) == count_parameters(base.unet)


def test_flops_of_the_dmoe_part_equal_the_formula(tiny_pair):
    base, moe = tiny_pair
    size = (32, 24, 16)
    fb, fm = count_flops(base, size, 2), count_flops(moe, size, 2)
    tokens = [math.prod(s // 2 ** i for s in size) for i in range(1, 3)]
    assert fm["dmoe"] == dmoe_flops(TINY_CHANNELS[1:], tokens, num_experts=8, top_k=2, ratio=4) > 0
    assert fm["total"] - fb["total"] == fm["dmoe"] and fb["dmoe"] == 0
    # the U-Net part: at least the convolutions' multiply-adds of the first stage's first conv
    assert fb["total"] > 2 * 8 * 1 * 27 * math.prod(size)


def test_grouped_mm_formula_counts_every_group():
    a, b = torch.randn(10, 16, dtype=torch.bfloat16), torch.randn(3, 16, 8, dtype=torch.bfloat16)
    offs = torch.tensor([2, 7, 10], dtype=torch.int32)
    assert torch._grouped_mm(a, b, offs=offs).shape == (10, 8)
    assert grouped_mm_flops(a.shape, b.shape) == 2 * 10 * 16 * 8


def test_peak_memory_sees_the_largest_live_set():
    def step():
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(1 << 20)
        del a, b
        c = torch.ones(1 << 19)
        del c

    peak = peak_memory_bytes(step, "cpu")
    assert 8 << 20 <= peak < 9 << 20


def test_cli_preset_writes_markdown(tmp_path, monkeypatch, capsys):
    out = tmp_path / "table.md"
    monkeypatch.setattr("sys.argv", ["nnUNetv2_dmoe_benchmark", "-preset", "tiny_3d", "-patch", "8", "8", "8",
                                     "-b", "1", "-repeats", "1", "-flops_size", "16", "16", "16", "-o", str(out)])
    benchmark_entry_point()
    text = out.read_text()
    assert text in capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert set(k.split(" (")[0].split(",")[0] for k in rows) >= {
        "Parameters", "GFLOPs", "Forward time", "Forward+backward time", "Peak memory forward+backward"}
    base, moe = build_pair(preset_configuration("tiny_3d"), num_levels=4)
    assert f"| {count_parameters(base) / 1e6:.2f} | {count_parameters(moe) / 1e6:.2f} |" in rows["Parameters (M)"]


@pytest.mark.parametrize("argv,message", [([], "-preset"), (["-preset", "nope"], "nope"),
                                          (["-preset", "tiny_3d", "-patch", "8", "8"], "-patch"),
                                          (["-preset", "tiny_3d", "-patch", "4", "8", "8"], "too small"),
                                          (["-preset", "tiny_3d", "-device", "tpu"], "tpu")])
def test_cli_bad_arguments(monkeypatch, capsys, argv, message):
    monkeypatch.setattr("sys.argv", ["nnUNetv2_dmoe_benchmark", *argv])
    with pytest.raises(SystemExit) as exit_:
        benchmark_entry_point()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("nnUNetv2_dmoe_benchmark: error: ") and re.search(message, err)


def test_cli_from_plans(preprocessed_3d, tmp_path):
    out = tmp_path / "plans.md"
    text = run(["nnUNetv2_dmoe_benchmark", "-d", "991", "-c", "3d_fullres", "--no_timing", "-flops_size", "32", "32",
                "32", "-o", str(out)], nnunet_env(preprocessed_3d))
    assert "dataset 991, configuration 3d_fullres" in text and "GFLOPs" in out.read_text()


def test_cpu_dropout_mask_keeps_one_minus_p():
    # the layer's CPU fast path for Dropout(p) (16-bit thresholds from 64-bit draws), optimised with these benchmarks
    from nnunet_dmoe.method.dmoe import _keep_mask

    torch.manual_seed(0)
    like = torch.empty(1000, 999)
    for p in (0.1, 0.5):
        keep = _keep_mask(like, p)
        assert keep.shape == like.shape and keep.dtype == torch.bool
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / like.numel())
    torch.manual_seed(1)
    a = _keep_mask(like, 0.1)
    torch.manual_seed(1)
    assert torch.equal(a, _keep_mask(like, 0.1))  # follows torch.manual_seed


def test_nnunet_train_step_updates_every_parameter(tiny_pair):
    # one nnU-Net iteration (loss over every deep-supervision output, clip, SGD with momentum) on the dMoE network:
    # every parameter, experts and routers included, gets a gradient and moves; momentum buffers for all of them
    from nnunet_dmoe.commands.benchmark.train_step import NNUNetTrainStep, make_inputs, make_targets

    _, moe = build_pair(preset_configuration("tiny_3d"), num_levels=4, deep_supervision=True)
    x = make_inputs(2, 2, 1, (16, 16, 16), 4, "cpu")
    targets = make_targets(moe, x, 2)
    assert [t.shape[2:] for t in targets] == [(16, 16, 16), (8, 8, 8)]
    moe.train()
    step = NNUNetTrainStep(moe, x, targets)
    before = [p.detach().clone() for p in moe.parameters()]
    step()
    assert all(p.grad is not None for p in moe.parameters())
    # every expert weight moves (idle experts by weight decay); of the routers (nn.Linear-initialised) those of the
    # batch's levels (1 and 2 -> routers 0 and 1) get a gradient, the others a zero one (weight decay moves them)
    for (name, p), old in zip(moe.named_parameters(), before):
        if ".experts." in name:
            assert not torch.equal(p, old), name
        elif ".router." in name:
            assert p.grad[:2].any() and not p.grad[2:].any() and not torch.equal(p[:2], old[:2]), name
    assert len(step.optimizer.state) == len(before)
    group = step.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (1e-2, 0.99, True, 3e-5)
    assert step.persistent_bytes() == 2 * sum(p.numel() * 4 for p in moe.parameters())


def test_train_step_report_with_two_backends_and_profiles():
    report = cost_report(preset_configuration("tiny_3d"), num_levels=4, num_input_channels=2,
                         num_outputs=2, attribute_channel=1, flops_size=(16, 16, 16), patch=(16, 16, 16),
                         batch=1, repeats=1, warmup=0, train_step=True, backends=("auto", "grouped_mm"),
                         profile=True)
    rows = report["rows"]
    assert set(rows) == {"parameters", "flops", "forward_s", "first_s", "train_s", "peak_bytes"}
    assert all(len(v) == 3 for v in rows.values())
    assert rows["parameters"][1] == rows["parameters"][2] > rows["parameters"][0]
    assert rows["peak_bytes"][1] > rows["peak_bytes"][0] > 0
    assert set(report["profiles"]) == {"base", "auto", "grouped_mm"}
    assert all("Self CPU" in t and "aten::" in t for t in report["profiles"].values())
    table = format_table(report, "tiny")
    assert "| | without dMoE | dMoE (auto) | ratio | dMoE (grouped_mm) | ratio |" in table
    assert "Train step (nnU-Net: AMP, SGD, clip)" in table


def test_cli_stages_all_adds_the_full_resolution_block(tmp_path, monkeypatch):
    """-stages all: the cost of a block after stage 0 too (the placement of version 0.2); the default is the paper's."""
    flops = {}
    for stages in (None, ["all"]):
        out = tmp_path / f"{stages}.json"
        monkeypatch.setattr("sys.argv", ["nnUNetv2_dmoe_benchmark", "-preset", "tiny_3d", "--no_timing",
                                         "-flops_size", "16", "16", "16", "-json", str(out)]
                            + (["-stages", *stages] if stages else []))
        benchmark_entry_point()
        flops[bool(stages)] = json.loads(out.read_text())["dmoe_flops"]
    tokens = [16 ** 3 // 8 ** i for i in range(3)]
    assert flops[False] == dmoe_flops(TINY_CHANNELS[1:], tokens[1:], num_experts=8, top_k=2, ratio=4)
    assert flops[True] == dmoe_flops(TINY_CHANNELS, tokens, num_experts=8, top_k=2, ratio=4)
