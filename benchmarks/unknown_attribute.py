"""How good is a dMoE prediction when the attribute is unknown?

Takes a finished demo folder (``nnUNetv2_dmoe_demo -o DIR``), writes the test images again with an all-zero
("unknown") attribute channel through ``nnunet_dmoe.data.attach.attach_attribute``, predicts them with
``nnUNetv2_predict`` for each trained method and compares Dice with the known-attribute predictions.

    python benchmarks/unknown_attribute.py -o demo_output [-fold 0]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

from nnunet_dmoe.data.attach import attach_attribute
from nnunet_dmoe.commands.demo import METHODS, PLANS, demo_env
from nnunet_dmoe.trainers.seam.training_length import variant_name
from nnunet_dmoe.evaluation import attributes_from_dataset_json, compare_methods


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", default="demo_output", help="[OPTIONAL] the demo's folder. Default: demo_output")
    p.add_argument("-fold", type=int, default=0, help="[OPTIONAL] replicate to use. Default: 0")
    p.add_argument("-bootstrap", type=int, default=1000, help="[OPTIONAL] resamples. Default: 1000")
    a = p.parse_args()
    out = os.path.abspath(a.o)
    with open(os.path.join(out, "demo_settings.json")) as f:
        settings = json.load(f)
    d, cfg = settings["dataset_id"], "3d_fullres" if settings["dim"] == 3 else "2d"
    raw = os.path.join(out, "nnUNet_raw", f"Dataset{d:03d}_SyntheticFairness")
    with open(os.path.join(raw, "dataset.json")) as f:
        dataset_json = json.load(f)
    fe = dataset_json["file_ending"]
    # image channel only, then an all-zero attribute channel written by the plugin's own tool
    images = os.path.join(raw, "imagesTs")
    unknown_in = os.path.join(out, "unknown_attribute", "imagesTs")
    shutil.rmtree(os.path.dirname(unknown_in), ignore_errors=True)
    os.makedirs(unknown_in)
    for f in os.listdir(images):
        if f.endswith("_0000" + fe):
            shutil.copy2(os.path.join(images, f), unknown_in)
    cases = {f[: -len("_0000" + fe)]: None for f in os.listdir(unknown_in)}
    attach_attribute(unknown_in, cases, dataset_json, verbose=False)

    env = demo_env(out)
    folders = {}
    for method, trainer in METHODS.items():
        tr = variant_name(trainer, settings["epochs"], settings["iters"])
        known = os.path.join(out, "predictions", f"{tr}_fold{a.fold}")
        unknown = os.path.join(out, "unknown_attribute", "predictions", f"{tr}_fold{a.fold}")
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnUNetv2_predict"), "-i", unknown_in, "-o",
                        unknown, "-d", str(d), "-c", cfg, "-tr", tr, "-p", PLANS, "-f", str(a.fold), "-device",
                        "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        folders[f"{method} (known)"] = known
        folders[f"{method} (unknown)"] = unknown
    result = compare_methods(folders, os.path.join(raw, "labelsTs"), [1],
                             attributes_from_dataset_json(os.path.join(raw, "dataset.json")),
                             os.path.join(out, "unknown_attribute", "report"), n_boot=a.bootstrap)
    print(f"{'method':<24}{'Dice':>8}{'ES-Dice':>9}  worst group")
    for name, s in result["methods"].items():
        print(f"{name:<24}{s['overall']['Dice']:>8.3f}{s['es']['Dice']:>9.3f}  {s['worst_group']['Dice']}")


if __name__ == "__main__":
    main()
