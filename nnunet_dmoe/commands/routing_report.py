"""``nnUNetv2_dmoe_routing_report``: which experts each attribute level uses, per (d)MoE block.

nnU-Net's own :class:`~nnunetv2.inference.predict_from_raw_data.nnUNetPredictor` predicts the cases (its
preprocessing, sliding windows, mirroring and fold ensembling, unchanged); forward hooks on its network record the
routing:

- a forward pre-hook on the network reads each window's input and decodes every attribute's level per sample from
  its channel (:func:`nnunet_dmoe.data.attribute.decode_attribute_levels`, the rule the network itself uses; a window
  whose channel is 0 everywhere, e.g. outside the image footprint, is "unknown", as for the network);
- a forward hook on the router (:class:`~nnunet_dmoe.method.dmoe.NoisyTopKRouter`) of every
  :class:`~nnunet_dmoe.method.dmoe.DistributionAwareMoE` counts, per sample, the tokens sent to each expert (top-k counted)
  and sums their gate values.

A block that runs more than once per forward pass (a transformer's shared (d)MoE after every transformer block)
gives one row set per call. No segmentation is exported: the predictions are not the product.

:class:`RoutingRecorder` is the hook part, usable on any network with (d)MoE blocks; :func:`routing_report` runs a
model folder over a folder of images; :func:`write_routing_json` and :func:`plot_routing` write the outputs.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from nnunet_dmoe.data.attribute import UNKNOWN_LEVEL, AttributeSpec, decode_attribute_levels, fmt_cases
from nnunet_dmoe.method.dmoe import DistributionAwareMoE, route_index_for_levels
from nnunet_dmoe.errors import command

__all__ = ["RoutingRecorder", "js_divergence", "routing_report", "write_routing_json", "plot_routing",
           "routing_report_entry_point", "UNKNOWN"]

UNKNOWN = UNKNOWN_LEVEL
COUNTING = ("fraction[e]: share of the row's tokens that have expert e among their top-k (each token counts once "
            "for each of its k experts, so a row sums to k); mean_gate[e]: mean gate value of expert e over the "
            "tokens that selected it (null where none did); tokens: tokens (voxels or transformer tokens) of all "
            "sliding windows, mirrored (TTA) windows and folds, background and padding included.")
JS_NOTE = ("Jensen-Shannon divergence (base 2, in [0, 1]) between the routing distributions fraction / k of the "
           "levels (unknown included) that have tokens; mean and max over all pairs of those levels.")
_NO_MOE = ("{where} has no (d)MoE block (no nnunet_dmoe.method.dmoe.DistributionAwareMoE module): there is no routing to "
           "report. Use a model trained with a (d)MoE trainer, e.g. nnUNetTrainerDMoE or nnUNetTrainerMoE "
           "(nnUNetv2_dmoe_list_trainers lists them).")


def _unwrap(network: nn.Module) -> nn.Module:
    """The module behind ``torch.compile`` / DistributedDataParallel wrappers."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(network, (OptimizedModule, DistributedDataParallel)):
        network = network._orig_mod if isinstance(network, OptimizedModule) else network.module
    return network


def _block_label(network: nn.Module, path: str, call: int, calls: int) -> Tuple[str, Optional[int]]:
    """A readable name of a block (``encoder stage 2``, ``transformer block 5``) and its stage/block index."""
    from nnunet_dmoe.networks.unet import AttributeUNet
    from nnunet_dmoe.networks.transformers import AttributeTransformer

    last = path.rsplit(".", 1)[-1]
    index = int(last) if last.isdigit() else None
    if isinstance(network, AttributeUNet) and index is not None:
        return f"encoder stage {index}", index
    if isinstance(network, AttributeTransformer):
        block = call if calls > 1 or network.placement == "shared" else index
        return f"transformer block {block}", block
    return (path if calls == 1 else f"{path} call {call}"), (index if calls == 1 else call)


class RoutingRecorder:
    """Forward hooks on ``network`` that count, per (d)MoE block and attribute level, the tokens routed to each expert.

    Use as a context manager around the forward passes (the hooks are removed on exit), then :meth:`blocks`::

        with RoutingRecorder(network, specs) as rec:
            network(x)
        rec.blocks()

    ``specs``: the attributes (:func:`nnunet_dmoe.data.attribute.attribute_specs_from_dataset_json`); each sample's level
    of attribute ``a`` is decoded from input channel ``specs[a].channel``. Rows are (attribute, level) with
    "unknown" last for each attribute. Counting stays on the network's device (no host synchronisation besides the
    decoding check of codes above the number of levels, which the network does too).
    """

    def __init__(self, network: nn.Module, specs: Sequence[AttributeSpec], where: str = "the network"):
        self.network = _unwrap(network)
        self.specs = list(specs)
        self.moes = [(name, m) for name, m in self.network.named_modules() if isinstance(m, DistributionAwareMoE)]
        if not self.moes:
            raise ValueError(_NO_MOE.format(where=where))
        # one row per router, in route_index_for_levels' order: each attribute's levels, then its unknown
        self.rows: List[Tuple[str, str]] = [(s.name, lv) for s in self.specs for lv in [*s.levels, UNKNOWN]]
        self._handles = []
        self._sample_rows: Optional[torch.Tensor] = None  # (A, b) row index per attribute and sample
        self._calls: Dict[str, int] = {}
        self._acc: Dict[Tuple[str, int], dict] = {}  # (module path, call) -> accumulators
        self._max_calls: Dict[str, int] = {}
        self.windows = 0

    # ---------------------------------------------------------------------------------------------------- hooks
    def __enter__(self):
        self._handles.append(self.network.register_forward_pre_hook(self._read_levels))
        for name, moe in self.moes:
            self._handles.append(moe.router.register_forward_hook(self._count(name, moe)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _read_levels(self, module, args):
        x = args[0]
        rows = []
        with torch.inference_mode():
            for spec in self.specs:
                if x.shape[1] <= spec.channel:
                    raise ValueError(f"the network's input has {x.shape[1]} channels, but attribute {spec.name!r} "
                                     f"is channel {spec.channel}: give the images with their attribute channel(s) "
                                     f"(nnUNetv2_dmoe_attach_attribute writes them)")
                level = decode_attribute_levels(x[:, spec.channel], spec.num_levels)
                rows.append(level)
            # a row per router: the network's own level -> router rule (each attribute's levels, then its unknown)
            self._sample_rows = route_index_for_levels(torch.stack(rows, dim=1),
                                                       [s.num_levels for s in self.specs], "dmoe").T
        self._calls = {}
        self.windows += x.shape[0]

    def _count(self, name: str, moe: DistributionAwareMoE):
        def hook(router, inputs, output):
            if self._sample_rows is None:
                raise RuntimeError("a (d)MoE router ran before the network's forward: RoutingRecorder counts routing "
                                   "only inside forward passes of the network it was given")
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            self._max_calls[name] = max(self._max_calls.get(name, 0), call + 1)
            gates, expert_index = output
            b = expert_index.shape[0]
            e = moe.num_experts
            with torch.inference_mode():
                idx = expert_index.reshape(b, -1)
                acc = self._acc.get((name, call))
                if acc is None:
                    dev = idx.device
                    gate_dtype = torch.float32 if dev.type == "mps" else torch.float64
                    acc = self._acc[(name, call)] = dict(
                        counts=torch.zeros(len(self.rows), e, dtype=torch.long, device=dev),
                        gate_sum=torch.zeros(len(self.rows), e, dtype=gate_dtype, device=dev),
                        tokens=torch.zeros(len(self.rows), dtype=torch.long, device=dev))
                counts = torch.zeros(b, e, dtype=torch.long, device=idx.device)
                counts.scatter_add_(1, idx, torch.ones_like(idx))
                gate_sum = torch.zeros(b, e, dtype=acc["gate_sum"].dtype, device=idx.device)
                gate_sum.scatter_add_(1, idx, gates.reshape(b, -1).to(gate_sum.dtype))
                rows = self._sample_rows.to(idx.device).reshape(-1)  # (A b,): attribute-major
                a = len(self.specs)
                acc["counts"].index_add_(0, rows, counts.repeat(a, 1))
                acc["gate_sum"].index_add_(0, rows, gate_sum.repeat(a, 1))
                acc["tokens"].index_add_(0, rows, torch.full((a * b,), expert_index.shape[1], dtype=torch.long,
                                                             device=idx.device))
        return hook

    # --------------------------------------------------------------------------------------------------- result
    def blocks(self) -> List[dict]:
        """One entry per (d)MoE block (and call), in forward order: name, label, index, channels, num_experts,
        top_k and, per attribute and level, tokens, fraction and mean_gate (see :data:`COUNTING`), and the
        Jensen-Shannon divergence between the levels (:data:`JS_NOTE`)."""
        out = []
        for (name, call) in self._acc:  # in the order of the first forward pass
            moe = dict(self.moes)[name]
            acc = {k: v.cpu() for k, v in self._acc[(name, call)].items()}
            label, index = _block_label(self.network, name, call, self._max_calls[name])
            block = {"name": name if self._max_calls[name] == 1 else f"{name}#{call}", "module": name, "call": call,
                     "label": label, "index": index, "channels": moe.dim, "num_experts": moe.num_experts,
                     "top_k": moe.top_k, "attributes": {}, "js_divergence": {}}
            for spec in self.specs:
                levels = {}
                for level in [*spec.levels, UNKNOWN]:
                    r = self.rows.index((spec.name, level))
                    n, counts, gsum = int(acc["tokens"][r]), acc["counts"][r].double(), acc["gate_sum"][r].double()
                    levels[level] = {
                        "tokens": n,
                        "fraction": (counts / n).tolist() if n else None,
                        "mean_gate": [float(g / c) if c else None for g, c in zip(gsum, counts)] if n else None}
                block["attributes"][spec.name] = levels
                block["js_divergence"][spec.name] = _js_summary(levels, moe.top_k)
            out.append(block)
        return out


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence of two distributions, base 2 (0 = identical, 1 = disjoint supports)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = 0.5 * (p + q)

    def kl(a):
        keep = a > 0
        return float(np.sum(a[keep] * np.log2(a[keep] / m[keep])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def _js_summary(levels: Mapping[str, Mapping], top_k: int) -> dict:
    present = [lv for lv, r in levels.items() if r["tokens"]]
    pairs = {}
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            pairs[f"{a} | {b}"] = js_divergence(np.array(levels[a]["fraction"]) / top_k,
                                                np.array(levels[b]["fraction"]) / top_k)
    values = list(pairs.values())
    return {"levels": present, "mean": float(np.mean(values)) if values else None,
            "max": float(np.max(values)) if values else None, "pairs": pairs}


# ------------------------------------------------------------------------------------------------------ outputs
def write_routing_json(report: Mapping, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def _js_text(block: Mapping) -> str:
    parts = []
    for name, js in block["js_divergence"].items():
        text = "n/a (fewer than 2 levels with tokens)" if js["mean"] is None else \
            f"mean {js['mean']:.3f}, max {js['max']:.3f}"
        parts.append(f"JS {name}: {text}" if len(block["js_divergence"]) > 1 else f"JS between levels: {text}")
    return "; ".join(parts)


def plot_routing(report: Mapping, path: str) -> None:
    """One heat map per block: rows (attribute, level), columns experts, cells the fraction of tokens routed to the
    expert (a row sums to k); the title holds the Jensen-Shannon divergence between the levels (base 2)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = report["blocks"]
    ncols = min(3, len(blocks))
    nrows = math.ceil(len(blocks) / ncols)
    e = max(b["num_experts"] for b in blocks)
    n_rows = sum(len(levels) for levels in blocks[0]["attributes"].values())
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * (0.55 * e + 3.2), nrows * (0.4 * n_rows + 1.8)),
                             squeeze=False)
    for ax in axes.flat[len(blocks):]:
        ax.axis("off")
    several = len(blocks[0]["attributes"]) > 1
    for ax, block in zip(axes.flat, blocks):
        labels, values = [], []
        for attr, levels in block["attributes"].items():
            for level, row in levels.items():
                labels.append(f"{attr}={level}" if several else level)
                labels[-1] += f" (n={row['tokens']})" if row["tokens"] else " (no tokens)"
                values.append(row["fraction"] if row["fraction"] is not None else [np.nan] * block["num_experts"])
        data = np.ma.masked_invalid(np.array(values, dtype=float))
        image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(data.filled(np.nan)):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(block["num_experts"]))
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_title(f"{block['label']} ({block['channels']} ch, top-{block['top_k']})\n{_js_text(block)}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of tokens")
    fig.suptitle(f"Routing per level ({report['model']['routing']}): fraction of tokens per expert, rows sum to k",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ running
def _input_cases(input_folder: str, dataset_json: Mapping, specs: Sequence[AttributeSpec]) -> Dict[str, List[str]]:
    """case id -> its image files (nnU-Net naming), checked for the number of channels the model takes."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    attr = ", ".join(f"{s.name!r} is channel {s.channel} (_{s.channel:04d}{ending})" for s in specs)
    if not os.path.isdir(input_folder):
        raise ValueError(f"-i {input_folder} is not a folder. Give the folder of images (nnU-Net naming "
                         f"CASE_XXXX{ending}, attribute channel(s) included).")
    lists = create_lists_from_splitted_dataset_folder(input_folder, ending, num_processes=1)
    if not lists:
        raise ValueError(f"-i {input_folder} holds no images ending in {ending} (the model's file_ending). Give "
                         f"the images in nnU-Net naming, CASE_XXXX{ending}, with the attribute channel(s): {attr}.")
    cases = {os.path.basename(files[0])[:-(len(ending) + 5)]: files for files in lists}
    bad = []
    for case, files in cases.items():
        have = {int(os.path.basename(f)[-(len(ending) + 4):-len(ending)]) for f in files}
        missing = [c for c in range(n_channels) if c not in have]
        if missing or len(files) != n_channels:
            bad.append(f"{case} (missing: {', '.join(f'{case}_{c:04d}{ending}' for c in missing) or 'none'}; "
                       f"{len(files)} files for {n_channels} channels)")
    if bad:
        raise ValueError(f"{len(bad)} case(s) of {input_folder} lack input channels: {fmt_cases(bad, sep='; ')}. The "
                         f"model takes {n_channels} channels; the attribute {attr}. Write the attribute channel with "
                         f"nnUNetv2_dmoe_attach_attribute.")
    return cases


def _choose_device(name: str) -> torch.device:
    """The device as ``nnUNetv2_predict`` chooses it (threads included)."""
    import multiprocessing

    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"-device must be cpu, cuda or mps, got {name!r}")
    if name == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    elif name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("-device cuda (the default) but torch sees no CUDA device here; use -device cpu")
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    return torch.device(name)


def routing_report(input_folder: str, output_folder: str, model_folder: str, folds: Sequence = (0,),
                   checkpoint: str = "checkpoint_final.pth", device: torch.device = torch.device("cuda"),
                   use_mirroring: bool = True, tile_step_size: float = 0.5, progress: bool = True) -> dict:
    """Run the model of ``model_folder`` (nnU-Net's predictor) over the cases of ``input_folder`` and write
    ``routing.json`` and ``routing.png`` into ``output_folder``. Returns the report (the content of routing.json)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from tqdm import tqdm

    from nnunet_dmoe.data.attribute import attribute_specs_from_dataset_json

    dj_path = os.path.join(model_folder, "dataset.json")
    if not os.path.isfile(dj_path):
        raise ValueError(f"{model_folder} is not a trained model folder (no dataset.json). Check -d, -tr, -p, -c "
                         f"and $nnUNet_results.")
    folds = [f if f == "all" else int(f) for f in folds]
    absent = [os.path.join(model_folder, f"fold_{f}", checkpoint) for f in folds
              if not os.path.isfile(os.path.join(model_folder, f"fold_{f}", checkpoint))]
    if absent:
        raise ValueError(f"no checkpoint {', '.join(absent)}. Train those folds, or choose others with -f / -chk.")
    with open(dj_path) as f:
        dataset_json = json.load(f)
    specs = attribute_specs_from_dataset_json(dataset_json, dj_path)
    cases = _input_cases(input_folder, dataset_json, specs)

    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=device.type != "cpu", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint)
    # the hooks see every call of an eager network; torch.compile (nnUNet_compile) is not needed for a report
    predictor.network = _unwrap(predictor.network)
    recorder = RoutingRecorder(predictor.network, specs,
                               where=f"The model {model_folder} (trainer {predictor.trainer_name})")
    config = getattr(recorder.network, "config", None)
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    os.makedirs(output_folder, exist_ok=True)
    with recorder:
        for case, files in tqdm(cases.items(), desc="routing", disable=not progress):
            data, _, _ = preprocessor.run_case(files, None, predictor.plans_manager, predictor.configuration_manager,
                                               predictor.dataset_json)
            try:
                predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))
            except ValueError as e:  # a code above the number of levels, named by sample: name the case
                raise ValueError(f"case {case} ({', '.join(files)}): {e}") from None
    blocks = recorder.blocks()
    moe0 = recorder.moes[0][1]
    report = {
        "model": {"folder": os.path.abspath(model_folder), "trainer": predictor.trainer_name, "folds": folds,
                  "checkpoint": checkpoint, "routing": getattr(config, "mode", None),
                  "num_experts": moe0.num_experts, "top_k": moe0.top_k,
                  "mirroring_axes": list(predictor.allowed_mirroring_axes or []) if use_mirroring else [],
                  "tile_step_size": tile_step_size},
        "input": {"folder": os.path.abspath(input_folder), "cases": len(cases),
                  "network_forward_samples": recorder.windows},
        "attributes": [{"name": s.name, "levels": [*s.levels, UNKNOWN], "channel": s.channel} for s in specs],
        "counting": COUNTING,
        "js_divergence": JS_NOTE,
        "blocks": blocks,
    }
    write_routing_json(report, os.path.join(output_folder, "routing.json"))
    plot_routing(report, os.path.join(output_folder, "routing.png"))
    return report


@command("nnUNetv2_dmoe_routing_report")
def routing_report_entry_point(argv: Optional[List[str]] = None):
    import argparse

    from nnunetv2.utilities.file_path_utilities import get_output_folder

    parser = argparse.ArgumentParser(
        description="Which experts each attribute level uses: runs a trained (d)MoE model over images (nnU-Net's "
                    "predictor, sliding windows, eval mode) and writes routing.json (per (d)MoE block and level: "
                    "fraction of tokens per expert, mean gate, token counts, Jensen-Shannon divergence between "
                    "levels) and routing.png (one heat map per block) into -o. No segmentations are written.")
    parser.add_argument("-i", type=str, required=True,
                        help="[REQUIRED] folder of images in nnU-Net naming, attribute channel(s) included")
    parser.add_argument("-o", type=str, required=True, help="[REQUIRED] output folder for routing.json and routing.png")
    parser.add_argument("-d", type=str, required=True, help="[REQUIRED] dataset name or id of the model")
    parser.add_argument("-c", type=str, required=True, help="[REQUIRED] configuration of the model, e.g. 3d_fullres")
    parser.add_argument("-tr", type=str, required=True, help="[REQUIRED] trainer of the model, e.g. nnUNetTrainerDMoE")
    parser.add_argument("-p", type=str, default="nnUNetPlans", help="[OPTIONAL] plans identifier. Default: nnUNetPlans")
    parser.add_argument("-f", nargs="+", type=str, default=["0"],
                        help="[OPTIONAL] folds whose networks run (their routing is pooled). Default: 0")
    parser.add_argument("-chk", type=str, default="checkpoint_final.pth",
                        help="[OPTIONAL] checkpoint name. Default: checkpoint_final.pth")
    parser.add_argument("-step_size", type=float, default=0.5,
                        help="[OPTIONAL] sliding-window step as a fraction of the patch size. Default: 0.5")
    parser.add_argument("--disable_tta", action="store_true",
                        help="[OPTIONAL] no mirroring; by default mirrored windows run and count, as in prediction")
    parser.add_argument("-device", type=str, default="cuda",
                        help="[OPTIONAL] cuda, cpu or mps (chosen as nnUNetv2_predict does). Default: cuda")
    parser.add_argument("--disable_progress_bar", action="store_true", help="[OPTIONAL] no progress bar")
    args = parser.parse_args(argv)

    device = _choose_device(args.device)
    model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
    report = routing_report(args.i, args.o, model_folder, args.f, args.chk, device, not args.disable_tta,
                            args.step_size, not args.disable_progress_bar)
    for block in report["blocks"]:
        print(f"{block['label']:<22} {block['channels']:>4} ch  {_js_text(block)}")
    print(f"\nRouting report written to {args.o} (routing.json, routing.png)")
