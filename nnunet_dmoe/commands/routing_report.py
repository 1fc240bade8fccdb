"""``nnUNetv2_dmoe_routing_report``: which experts each attribute level uses, per (d)MoE block.

nnU-Net's own :class:`~nnunetv2.inference.predict_from_raw_data.nnUNetPredictor` predicts the cases (its
preprocessing, sliding windows, mirroring and fold ensembling, unchanged); forward hooks on its network record the
routing (:class:`nnunet_dmoe.commands.routing_recorder.RoutingRecorder`: per (d)MoE block, attribute and level, the
tokens sent to each expert and their gate values). No segmentation is exported: the predictions are not the product.

:func:`routing_report` runs a model folder over a folder of images and writes ``routing.json`` and ``routing.png``
(:mod:`nnunet_dmoe.commands.routing_summary`); :func:`run_routing_report` is the command.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from nnunet_dmoe.commands.routing_recorder import COUNTING, UNKNOWN, RoutingRecorder, unwrap
from nnunet_dmoe.commands.routing_summary import JS_NOTE, js_text, plot_routing, write_routing_json
from nnunet_dmoe.data.attribute import AttributeSpec, cases_in_folder, fmt_cases
from nnunet_dmoe.errors import command

__all__ = ["input_cases", "choose_device", "routing_report", "run_routing_report", "routing_report_entry_point"]


def input_cases(input_folder: str, dataset_json: Mapping, specs: Sequence[AttributeSpec]) -> Dict[str, List[str]]:
    """case id -> its image files (nnU-Net naming), checked for the number of channels the model takes."""
    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    attr = ", ".join(f"{s.name!r} is channel {s.channel} (_{s.channel:04d}{ending})" for s in specs)
    if not os.path.isdir(input_folder):
        raise ValueError(f"-i {input_folder} is not a folder. Give the folder of images (nnU-Net naming "
                         f"CASE_XXXX{ending}, attribute channel(s) included).")
    found = cases_in_folder(input_folder, ending)
    if not found:
        raise ValueError(f"-i {input_folder} holds no images ending in {ending} (the model's file_ending). Give "
                         f"the images in nnU-Net naming, CASE_XXXX{ending}, with the attribute channel(s): {attr}.")
    bad = []
    for case, files in sorted(found.items()):
        missing = [c for c in range(n_channels) if c not in files]
        if missing or len(files) != n_channels:
            bad.append(f"{case} (missing: {', '.join(f'{case}_{c:04d}{ending}' for c in missing) or 'none'}; "
                       f"{len(files)} files for {n_channels} channels)")
    if bad:
        raise ValueError(f"{len(bad)} case(s) of {input_folder} lack input channels: {fmt_cases(bad, sep='; ')}. The "
                         f"model takes {n_channels} channels; the attribute {attr}. Write the attribute channel with "
                         f"nnUNetv2_dmoe_attach_attribute.")
    return {case: [found[case][c] for c in sorted(found[case])] for case in sorted(found)}


def choose_device(name: str) -> torch.device:
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


def _model_dataset_json(model_folder: str, folds: Sequence, checkpoint: str) -> Tuple[dict, list]:
    """The model folder's dataset.json and the folds (numbers, or "all"), checked for their checkpoints."""
    import json

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
        return json.load(f), folds


def _record(predictor, recorder: RoutingRecorder, cases: Mapping[str, List[str]], progress: bool) -> None:
    """Preprocess and predict every case (logits only) with the recorder's hooks on."""
    from tqdm import tqdm

    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    with recorder:
        for case, files in tqdm(cases.items(), desc="routing", disable=not progress):
            data, _, _ = preprocessor.run_case(files, None, predictor.plans_manager, predictor.configuration_manager,
                                               predictor.dataset_json)
            try:
                predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))
            except ValueError as e:  # a code above the number of levels, named by sample: name the case
                raise ValueError(f"case {case} ({', '.join(files)}): {e}") from None


def routing_report(input_folder: str, output_folder: str, model_folder: str, folds: Sequence = (0,),
                   checkpoint: str = "checkpoint_final.pth", device: torch.device = torch.device("cuda"),
                   use_mirroring: bool = True, tile_step_size: float = 0.5, progress: bool = True) -> dict:
    """Run the model of ``model_folder`` (nnU-Net's predictor) over the cases of ``input_folder`` and write
    ``routing.json`` and ``routing.png`` into ``output_folder``. Returns the report (the content of routing.json)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_dmoe.data.attribute import attribute_specs_from_dataset_json

    dataset_json, folds = _model_dataset_json(model_folder, folds, checkpoint)
    specs = attribute_specs_from_dataset_json(dataset_json, os.path.join(model_folder, "dataset.json"))
    cases = input_cases(input_folder, dataset_json, specs)
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=device.type != "cpu", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint)
    # the hooks see every call of an eager network; torch.compile (nnUNet_compile) is not needed for a report
    predictor.network = unwrap(predictor.network)
    recorder = RoutingRecorder(predictor.network, specs,
                               where=f"The model {model_folder} (trainer {predictor.trainer_name})")
    config = getattr(recorder.network, "config", None)
    os.makedirs(output_folder, exist_ok=True)
    _record(predictor, recorder, cases, progress)
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
        "blocks": recorder.blocks(),
    }
    write_routing_json(report, os.path.join(output_folder, "routing.json"))
    plot_routing(report, os.path.join(output_folder, "routing.png"))
    return report


def run_routing_report(input_folder: str, output_folder: str, dataset: str, configuration: str, trainer: str,
                       plans: str = "nnUNetPlans", folds: Sequence[str] = ("0",),
                       checkpoint: str = "checkpoint_final.pth", step_size: float = 0.5, mirroring: bool = True,
                       device: str = "cuda", progress: bool = True) -> dict:
    """The command: the routing report of the model (dataset, trainer, plans, configuration) in $nnUNet_results over
    ``input_folder``, written to ``output_folder``, and one line per block printed."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    torch_device = choose_device(device)
    model_folder = get_output_folder(dataset, trainer, plans, configuration)
    report = routing_report(input_folder, output_folder, model_folder, folds, checkpoint, torch_device, mirroring,
                            step_size, progress)
    for block in report["blocks"]:
        print(f"{block['label']:<22} {block['channels']:>4} ch  {js_text(block)}")
    print(f"\nRouting report written to {output_folder} (routing.json, routing.png)")
    return report


def _parser():
    import argparse

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
    return parser


@command("nnUNetv2_dmoe_routing_report")
def routing_report_entry_point(argv: Optional[List[str]] = None):
    args = _parser().parse_args(argv)
    run_routing_report(args.i, args.o, args.d, args.c, args.tr, args.p, args.f, args.chk, args.step_size,
                       not args.disable_tta, args.device, not args.disable_progress_bar)
