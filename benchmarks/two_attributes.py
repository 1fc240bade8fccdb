"""Two attributes at once: dMoE routed on the T-stage only, on T-stage and centre, and the attribute-blind baseline.

Data: the synthetic generator with its second attribute (``make_synthetic_dataset(centres=...)``: the CTV margin
depends on the T-stage and, by the centre's contouring convention, on the centre; the centre's scanner also shifts
the body intensity). Two raw datasets hold the same cases:

- ``DATASET``: image, T-stage channel and centre channel, dataset.json ``"attributes"`` [tstage, centre];
- ``DATASET + 1``: image and T-stage channel only, dataset.json ``"attribute"`` tstage (no centre anywhere).

Both go through ``nnUNetv2_dmoe_plan_and_preprocess`` (2d); then ``nnUNetv2_train`` / ``nnUNetv2_predict`` for

- ``Baseline``: ``nnUNetTrainerNoAttribute`` on ``DATASET`` (both channels stripped),
- ``dMoE (stage)``: ``nnUNetTrainerDMoE`` on ``DATASET + 1``,
- ``dMoE (stage+centre)``: ``nnUNetTrainerDMoE`` on ``DATASET`` (summed per-attribute routers),

and the fairness report (``nnunet_dmoe.evaluation.compare_methods``) per attribute and per combination of T-stage and
centre. Every stage is skipped when its result exists (a re-run resumes).

    python benchmarks/two_attributes.py -o two_attributes [-replicates 1] [-epochs 10] [-iters 50]
"""
import argparse
import json
import os
import shutil
import time

from nnunet_dmoe.data.attribute import attribute_specs_from_dataset_json
from nnunet_dmoe.commands.demo import PLANS, _bin, _run, demo_env
from nnunet_dmoe.evaluation import CaseAttributes, compare_methods
from nnunet_dmoe.dataset_conversion.synthetic import DEFAULT_CENTRES, make_synthetic_dataset
from nnunet_dmoe.trainers.seam.training_length import variant_name

NAME = "SyntheticTwoAttributes"


def _stage_only_copy(src: str, dst: str) -> None:
    """The same cases with the image and T-stage channels only, and the T-stage as the single attribute."""
    with open(os.path.join(src, "dataset.json")) as f:
        dj = json.load(f)
    fe = dj["file_ending"]
    for sub in ("imagesTr", "imagesTs", "labelsTr", "labelsTs"):
        os.makedirs(os.path.join(dst, sub), exist_ok=True)
        for name in os.listdir(os.path.join(src, sub)):
            if not (sub.startswith("images") and name.endswith(f"_0002{fe}")):
                shutil.copy2(os.path.join(src, sub, name), os.path.join(dst, sub, name))
    dj["attribute"] = dj.pop("attributes")[0]
    dj["channel_names"] = {k: v for k, v in dj["channel_names"].items() if k != "2"}
    dj["name"] = dj["dataset_name"] = os.path.basename(dst)
    with open(os.path.join(dst, "dataset.json"), "w") as f:
        json.dump(dj, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", default="two_attributes", help="[OPTIONAL] work folder. Default: two_attributes")
    p.add_argument("-d", type=int, default=996, help="[OPTIONAL] dataset id (and id + 1). Default: 996")
    p.add_argument("-num_train", type=int, default=60, help="[OPTIONAL] training cases. Default: 60")
    p.add_argument("-num_test", type=int, default=40, help="[OPTIONAL] test cases. Default: 40")
    p.add_argument("-size", type=int, nargs=2, default=[96, 96], help="[OPTIONAL] image size. Default: 96 96")
    p.add_argument("-epochs", type=int, default=10, help="[OPTIONAL] epochs. Default: 10")
    p.add_argument("-iters", type=int, default=50, help="[OPTIONAL] iterations per epoch. Default: 50")
    p.add_argument("-replicates", type=int, default=1, help="[OPTIONAL] folds 0..R-1. Default: 1")
    p.add_argument("-bootstrap", type=int, default=1000, help="[OPTIONAL] bootstrap resamples. Default: 1000")
    a = p.parse_args()
    t0 = time.time()
    out = os.path.abspath(a.o)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    env = demo_env(out)
    both, stage = f"Dataset{a.d:03d}_{NAME}", f"Dataset{a.d + 1:03d}_{NAME}StageOnly"
    raw_both, raw_stage = (os.path.join(env["nnUNet_raw"], n) for n in (both, stage))
    if not os.path.isfile(os.path.join(raw_both, "dataset.json")):
        make_synthetic_dataset(a.d, 2, a.num_train, a.num_test, a.size, 0, name=NAME,
                               raw_folder=env["nnUNet_raw"], centres=DEFAULT_CENTRES)
    if not os.path.isfile(os.path.join(raw_stage, "dataset.json")):
        _stage_only_copy(raw_both, raw_stage)
    for d, name in ((a.d, both), (a.d + 1, stage)):
        if not os.path.isfile(os.path.join(env["nnUNet_preprocessed"], name, PLANS + ".json")):
            _run([_bin("nnUNetv2_dmoe_plan_and_preprocess"), "-d", str(d), "-c", "2d", "-np", "2"], env,
                 os.path.join(out, "logs", f"plan_{d}.log"))

    methods = {"Baseline": ("nnUNetTrainerNoAttribute", a.d, both),
               "dMoE (stage)": ("nnUNetTrainerDMoE", a.d + 1, stage),
               "dMoE (stage+centre)": ("nnUNetTrainerDMoE", a.d, both)}
    predictions, seconds = {}, {}
    for r in range(a.replicates):
        for method, (trainer, d, name) in methods.items():
            tr = variant_name(trainer, a.epochs, a.iters)
            model = os.path.join(env["nnUNet_results"], name, f"{tr}__{PLANS}__2d", f"fold_{r}")
            if not os.path.isfile(os.path.join(model, "checkpoint_final.pth")):
                start = time.time()
                _run([_bin("nnUNetv2_train"), str(d), "2d", str(r), "-tr", tr, "-p", PLANS, "-device", "cpu"],
                     dict(env, nnUNet_n_proc_DA="0"), os.path.join(out, "logs", f"train_{d}_{tr}_{r}.log"))
                seconds[f"{method} r{r}"] = round(time.time() - start)
            pred = os.path.join(out, "predictions", f"{d}_{tr}_fold{r}")
            if not os.path.isfile(os.path.join(pred, "predict_from_raw_data_args.json")):
                _run([_bin("nnUNetv2_predict"), "-i", os.path.join(env["nnUNet_raw"], name, "imagesTs"), "-o", pred,
                      "-d", str(d), "-c", "2d", "-tr", tr, "-p", PLANS, "-f", str(r), "-device", "cpu", "-npp", "1",
                      "-nps", "1", "--disable_progress_bar"], env,
                     os.path.join(out, "logs", f"predict_{d}_{tr}_{r}.log"))
            predictions[method if a.replicates == 1 else f"{method} r{r}"] = pred

    with open(os.path.join(raw_both, "dataset.json")) as f:
        specs = attribute_specs_from_dataset_json(json.load(f))
    # one report: each attribute, and every combination of T-stage and centre (the test split's groups)
    groups = [CaseAttributes(spec.name, spec.levels, spec.all_cases) for spec in specs]
    result = compare_methods(predictions, os.path.join(raw_both, "labelsTs"), [1], groups,
                             os.path.join(out, "report"), n_boot=a.bootstrap)
    centres = specs[1].levels
    lines = ["| method | Dice | ES-Dice (T-stage) | worst T-stage | ES-Dice (centre) | "
             + " | ".join(f"Dice centre {c}" for c in centres) + " | ES-Dice (combinations) | worst combination |",
             "|---|---:|---:|---|---:|" + "---:|" * len(centres) + "---:|---|"]
    for m, summary in result["methods"].items():
        s, c, k = summary["attributes"]["tstage"], summary["attributes"]["centre"], summary["combinations"]
        lines.append(f"| {m} | {s['overall']['Dice']:.3f} | {s['es']['Dice']:.3f} | {s['worst_group']['Dice']} | "
                     f"{c['es']['Dice']:.3f} | "
                     + " | ".join(f"{c['groups'][g]['Dice']:.3f} (n={c['groups'][g]['n']})" for g in centres)
                     + f" | {k['es']['Dice']:.3f} | {k['worst_group']['Dice']} |")
    table = "\n".join(lines)
    os.makedirs(os.path.join(out, "report"), exist_ok=True)
    with open(os.path.join(out, "report", "two_attributes.md"), "w") as f:
        f.write(table + "\n")
    timing = os.path.join(out, "report", "train_seconds.json")  # kept over resumed runs
    if os.path.isfile(timing):
        with open(timing) as f:
            seconds = {**json.load(f), **seconds}
    with open(timing, "w") as f:
        json.dump(seconds, f, indent=1)
    print(table)
    print(f"\nDone in {time.time() - t0:.0f} s; reports in {os.path.join(out, 'report')}")


if __name__ == "__main__":
    main()
