"""The main job: from nothing to a paper-style fairness comparison, with nnU-Net's own CLIs.

1. writes the synthetic fairness dataset (``nnunet_dmoe.dataset_conversion.synthetic``; the CTV margin depends on the T-stage),
2. plans and preprocesses it (``nnUNetv2_dmoe_plan_and_preprocess``: nnU-Net's planner, sized for the dMoE, one
   plans file for all methods),
3. trains the attribute-blind baseline, the baseline with the attribute as an input channel, MoE and dMoE
   (``nnUNetv2_train``), one run per replicate (fold ``r`` with its own seed); with ``-methods`` /
   ``--all_methods`` also the dMoE's variants (no "unknown" router; routers started at zero; a block at full
   resolution too: plans variants ``nnUNetDMoEPlans_<name>`` that differ only in their ``"dmoe"`` block) and the
   fairness comparators (Group DRO, FEBS fine-tuned from the baseline's checkpoint as FairSeg trains it,
   adversarial, group-balanced sampling, FiLM, one network per level: ``nnUNetv2_dmoe_train_per_level``'s layout),
4. predicts the test split (``nnUNetv2_predict``; per level: ``nnunet_dmoe.commands.per_level.predict_per_level``),
5. writes the fairness report comparing them (``nnunet_dmoe.evaluation.compare_methods``), for several
   replicates their mean and spread, and each training's time (the sum of nnU-Net's epoch times,
   ``training_times.md``).

Every stage is skipped when its result exists already (a re-run resumes); the settings are kept in
``demo_settings.json`` and a re-run with other settings needs ``--overwrite`` or another ``-o``.
``python -m nnunet_dmoe.commands.demo -h`` lists the sizes; the defaults fit a 2-core CPU in well under 20 minutes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_dmoe.commands.demo_report import fairness_report
from nnunet_dmoe.errors import command

METHODS = {  # report name -> trainer class
    "Baseline": "nnUNetTrainerNoAttribute",
    "Attr-channel": "nnUNetTrainerAttributeChannel",
    "MoE": "nnUNetTrainerMoE",
    "dMoE": "nnUNetTrainerDMoE",
}
# the dMoE with other settings (opt-in: -methods NAME ... or --all_methods): the paper's setting without an "unknown"
# router, and the two defaults that changed in version 0.3, each in a plans variant of its own (below)
VARIANTS = {
    "dMoE-noUnknown": "nnUNetTrainerDMoE_noUnknown",
    "dMoE-upcycled": "nnUNetTrainerDMoE",  # fine-tuned from the baseline (below), half the epochs
    "dMoE-zero-router": "nnUNetTrainerDMoE",
    "dMoE-all-stages": "nnUNetTrainerDMoE",
}
# method -> (plans variant name, "dmoe" settings that it changes); nnU-Net's plans identifier PLANS_<name>. The
# upcycled dMoE changes nothing: a plans variant of its own keeps its model folder apart from the dMoE's.
PLANS_VARIANTS = {
    "dMoE-zero-router": ("routerZero", {"router_init": "zero"}),
    "dMoE-all-stages": ("allStages", {"stages": "all"}),
    "dMoE-upcycled": ("upcycled", {}),
}
# fairness comparators (opt-in: -methods NAME ... or --all_methods)
PER_LEVEL = "Per-level"
COMPARATORS = {
    "GroupDRO": "nnUNetTrainerGroupDRO",
    "FEBS": "nnUNetTrainerFEBS",
    "Adversarial": "nnUNetTrainerAdversarial",
    "GroupBalanced": "nnUNetTrainerGroupBalanced",
    "FiLM": "nnUNetTrainerFiLM",
    PER_LEVEL: "nnUNetTrainerNoAttribute",  # one per level (nnunet_dmoe.commands.per_level)
}
# method -> the method whose final checkpoint of the same fold it fine-tunes (-pretrained_weights), as FairSeg
# trains FEBS: from a trained model
FINE_TUNED_FROM = {"FEBS": "Baseline", "dMoE-upcycled": "Baseline"}
# method -> its share of the demo's epochs (fine-tuning an upcycled baseline for a few epochs)
EPOCH_SHARE = {"dMoE-upcycled": 0.5}
# the paper's 2D setting, a ViT-B/16 TransUNet (opt-in with -methods NAME; not in --all_methods: on this project's
# 2-core CPU one replicate took about 9 min for TransUNet and 26 min for TransUNet-dMoE, the U-Nets 4-8 min, when
# the demo still made OpenMP threads sleep; the U-Nets now take 1.5-3 min)
TRANSFORMERS = {
    "TransUNet": "nnUNetTrainerTransUNet",
    "TransUNet-MoE": "nnUNetTrainerTransUNetMoE",
    "TransUNet-dMoE": "nnUNetTrainerTransUNetDMoE",
}
ALL_METHODS = {**METHODS, **VARIANTS, **COMPARATORS, **TRANSFORMERS}
PLANS = "nnUNetDMoEPlans"
# lines of the nnU-Net CLIs worth showing as progress (everything goes to the log files)
_PROGRESS = re.compile(r"Epoch \d+$|train_loss|Pseudo dice|Epoch time|Mean Validation Dice|Predicting |Preprocessing "
                       r"dataset|Plans were saved|agree for all|Error|error|Traceback")


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def _run(cmd: List[str], env: Dict[str, str], log_path: str, show: bool = True) -> None:
    """Run a CLI, keep its whole output in ``log_path`` and show the progress lines."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log_path, "a") as log:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in p.stdout:
            log.write(line)
            if show and _PROGRESS.search(line):
                print("    " + line.rstrip()[-150:], flush=True)
        if p.wait() != 0:
            raise RuntimeError(f"{cmd[0]} failed with exit code {p.returncode}; see {log_path}")


def demo_env(output: str) -> Dict[str, str]:
    """Environment for nnU-Net's CLIs on a demo folder: its own nnUNet_raw/preprocessed/results."""
    env = dict(os.environ, nnUNet_raw=os.path.join(output, "nnUNet_raw"),
               nnUNet_preprocessed=os.path.join(output, "nnUNet_preprocessed"),
               nnUNet_results=os.path.join(output, "nnUNet_results"), nnUNet_def_n_proc="1")
    # No OMP_WAIT_POLICY=PASSIVE: training augments in its own process (nnUNet_n_proc_DA=0), so nothing else wants
    # the cores, and OpenMP threads that sleep after every parallel region doubled the demo's training time on a
    # 2-core CPU (MoE epoch 30 s with it, 12.5 s without); prediction took the same time either way.
    return env


@dataclass
class _Demo:
    """One demo run: its settings, nnU-Net's environment on its folder, and the trainer class of every method."""
    output: str
    dataset_id: int
    dim: int
    epochs: int
    iters: Optional[int]
    device: str
    num_test: int
    trainers: Dict[str, str]
    env: Dict[str, str]
    t_start: float

    @property
    def configuration(self) -> str:
        return "3d_fullres" if self.dim == 3 else "2d"

    @property
    def name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_SyntheticFairness"

    @property
    def raw(self) -> str:
        return os.path.join(self.env["nnUNet_raw"], self.name)

    @property
    def logs(self) -> str:
        return os.path.join(self.output, "logs")

    def stage(self, text: str) -> None:
        print(f"\n=== [{time.time() - self.t_start:6.0f} s] {text}", flush=True)

    def train(self, method: str, r: int) -> str:
        """The model folder of ``method``, fold ``r``, trained unless it exists (and its starting model first)."""
        from nnunet_dmoe.trainers.seam.training_length import variant_name

        trainer = self.trainers.get(method) or variant_name(ALL_METHODS[method], epochs_of(method, self.epochs),
                                                            self.iters)
        plans = plans_of(method)
        model = os.path.join(self.env["nnUNet_results"], self.name, f"{trainer}__{plans}__{self.configuration}",
                             f"fold_{r}")
        if os.path.isfile(os.path.join(model, "checkpoint_final.pth")):
            print(f"reusing {model}")
            return model
        cmd = [_bin("nnUNetv2_train"), str(self.dataset_id), self.configuration, str(r), "-tr", trainer, "-p", plans,
               "-device", self.device]
        if method in FINE_TUNED_FROM:
            start = self.train(FINE_TUNED_FROM[method], r)
            print(f"{method} fine-tunes {FINE_TUNED_FROM[method]}'s final checkpoint of fold {r}")
            cmd += ["-pretrained_weights", os.path.join(start, "checkpoint_final.pth")]
        _run(cmd, dict(self.env, nnUNet_n_proc_DA="0"),
             os.path.join(self.logs, f"train_{trainer}_{plans}_fold{r}.log"))
        return model

    def predict(self, method: str, r: int) -> str:
        """The test split's prediction folder of ``method``, fold ``r``, predicted unless it is complete."""
        trainer, plans = self.trainers[method], plans_of(method)
        out = os.path.join(self.output, "predictions", f"{trainer}_{plans}_fold{r}")
        if not os.path.isfile(os.path.join(out, "predict_from_raw_data_args.json")) or \
                len([f for f in os.listdir(out) if f.endswith(("nii.gz", ".png"))]) < self.num_test:
            _run([_bin("nnUNetv2_predict"), "-i", os.path.join(self.raw, "imagesTs"), "-o", out, "-d",
                  str(self.dataset_id), "-c", self.configuration, "-tr", trainer, "-p", plans, "-f", str(r),
                  "-device", self.device, "-npp", "1", "-nps", "1", "--disable_progress_bar"], self.env,
                 os.path.join(self.logs, f"predict_{trainer}_{plans}_fold{r}.log"))
        return out


def _demo_trainers(methods: Sequence[str], epochs: int, iters) -> Dict[str, str]:
    """The trainer class of every method (a schedule of ``epochs`` epochs, ``iters`` iterations each)."""
    from nnunet_dmoe.trainers.seam.training_length import variant_name

    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"-methods {unknown}: choose from {list(ALL_METHODS)}")
    try:
        return {m: variant_name(ALL_METHODS[m], epochs_of(m, epochs), iters) for m in methods}
    except ValueError as e:
        raise ValueError(f"-epochs {epochs} / -iters {iters}: {e}") from None


def _keep_settings(output: str, settings: dict, overwrite: bool) -> None:
    """Write ``demo_settings.json`` into ``output`` (made with its logs folder); a run there with other settings is
    an error, or removed with ``overwrite``."""
    settings_file = os.path.join(output, "demo_settings.json")
    if os.path.isfile(settings_file):
        with open(settings_file) as f:
            old = json.load(f)
        if old != settings:
            if not overwrite:
                raise ValueError(f"{output} holds a run with other settings ({old}). Pass --overwrite to replace "
                                 f"it or choose another -o.")
            shutil.rmtree(output)
    os.makedirs(os.path.join(output, "logs"), exist_ok=True)
    with open(settings_file, "w") as f:
        json.dump(settings, f, indent=1)


def _make_data(demo: _Demo, num_train: int, size: Optional[Sequence[int]], data_seed: int) -> str:
    """Stages 1 and 2: the synthetic dataset and its plans (each reused when present); returns the plans file."""
    from nnunet_dmoe.dataset_conversion.synthetic import make_synthetic_dataset

    demo.stage(f"1/5 synthetic {demo.dim}D dataset: {num_train} training and {demo.num_test} test cases")
    if not os.path.isfile(os.path.join(demo.raw, "dataset.json")):
        make_synthetic_dataset(demo.dataset_id, demo.dim, num_train, demo.num_test, size, data_seed,
                               raw_folder=demo.env["nnUNet_raw"])
    else:
        print(f"reusing {demo.raw}")
    demo.stage("2/5 nnU-Net plan and preprocess")
    plans_file = os.path.join(demo.env["nnUNet_preprocessed"], demo.name, PLANS + ".json")
    if not os.path.isfile(plans_file):
        _run([_bin("nnUNetv2_dmoe_plan_and_preprocess"), "-d", str(demo.dataset_id), "-c", demo.configuration,
              "-np", "2"], demo.env, os.path.join(demo.logs, "plan_and_preprocess.log"))
    else:
        print(f"reusing {plans_file}")
    return plans_file


def _train_and_predict(demo: _Demo, methods: Sequence[str],
                       replicates: int) -> Tuple[Dict[str, str], Dict[str, List[str]]]:
    """Stages 3 and 4 for every replicate and method: (run label -> predictions, run label -> model folders)."""
    predictions: Dict[str, str] = {}
    models: Dict[str, List[str]] = {}
    for r in range(replicates):
        for method in methods:
            trainer = demo.trainers[method]
            label = method if replicates == 1 else f"{method} r{r}"
            if method == PER_LEVEL:
                demo.stage(f"3-4/5 {method}: train {trainer} on each level's cases, predict each test case with its "
                           f"level's model (replicate {r} = fold {r})")
                predictions[label], models[label] = _per_level(
                    demo.dataset_id, demo.configuration, r, trainer, demo.device, demo.env, demo.logs,
                    os.path.join(demo.raw, "imagesTs"), demo.output, demo.num_test)
                continue
            demo.stage(f"3/5 train {method} ({trainer}, plans {plans_of(method)}, replicate {r} = fold {r})")
            models[label] = [demo.train(method, r)]
            demo.stage(f"4/5 predict the test split with {method} (replicate {r})")
            predictions[label] = demo.predict(method, r)
    return predictions, models


def run_demo(output: str = "demo_output", dataset_id: int = 990, dim: int = 2, num_train: int = 60,
             num_test: int = 40, size: Sequence[int] = None, data_seed: int = 0, epochs: int = 10, iters=50,
             replicates: int = 1, methods: Sequence[str] = tuple(METHODS), device: str = "cpu", n_boot: int = 1000,
             overwrite: bool = False) -> dict:
    """The demo (see the module docstring); returns :func:`nnunet_dmoe.evaluation.compare_methods`' result."""
    t_start = time.time()
    trainers = _demo_trainers(methods, epochs, iters)
    settings = dict(dataset_id=dataset_id, dim=dim, num_train=num_train, num_test=num_test,
                    size=list(size) if size else None, data_seed=data_seed, epochs=epochs, iters=iters)
    output = os.path.abspath(output)
    _keep_settings(output, settings, overwrite)
    demo = _Demo(output, dataset_id, dim, epochs, iters, device, num_test, trainers, demo_env(output), t_start)
    plans_file = _make_data(demo, num_train, size, data_seed)
    for method in methods:
        if method in PLANS_VARIANTS:
            write_plans_variant(plans_file, *PLANS_VARIANTS[method])
    predictions, models = _train_and_predict(demo, methods, replicates)
    demo.stage("5/5 fairness report")
    return fairness_report(output, demo.raw, predictions, models, methods, replicates, n_boot, t_start)

@contextmanager
def _environ(env: Dict[str, str]):
    """nnU-Net's path variables of the demo in this process (nnunetv2.paths reads them when used)."""
    keys = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: env[k] for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _per_level(dataset_id: int, configuration: str, fold: int, trainer: str, device: str, env: Dict[str, str],
               logs: str, images: str, output: str, num_test: int):
    """One network per level: train what is missing, predict what is missing; returns the prediction folder and
    the model folders."""
    from nnunet_dmoe.commands.per_level import per_level_training_commands, predict_per_level

    with _environ(env):
        jobs = per_level_training_commands(str(dataset_id), configuration, fold, trainer, PLANS, device)
        for job in jobs:
            if os.path.isfile(os.path.join(job["model_folder"], f"fold_{fold}", "checkpoint_final.pth")):
                print(f"reusing {job['model_folder']}")
                continue
            _run(job["cmd"], dict(job["env"], nnUNet_n_proc_DA="0"),
                 os.path.join(logs, f"train_per_level_{trainer}_{job['level']}_fold{fold}.log"))
        out = os.path.join(output, "predictions", f"per_level_{trainer}_fold{fold}")
        done = os.path.isdir(out) and len([f for f in os.listdir(out) if f.endswith(("nii.gz", ".png"))]) >= num_test
        if not done:
            print(f"$ nnunet_dmoe.commands.per_level.predict_per_level -> {out}", flush=True)
            predict_per_level(images, out, str(dataset_id), configuration, fold, trainer, PLANS, device,
                              sequential=True)
        else:
            print(f"reusing {out}")
    return out, [os.path.join(job["model_folder"], f"fold_{fold}") for job in jobs]


def epochs_of(method: str, epochs: int) -> int:
    """The epochs ``method`` trains for in a demo of ``epochs`` epochs (a schedule that has a class)."""
    from nnunet_dmoe.trainers.seam.training_length import EPOCHS

    if method not in EPOCH_SHARE:
        return epochs
    wanted = max(1, round(epochs * EPOCH_SHARE[method]))
    return min(EPOCHS, key=lambda e: (abs(e - wanted), e))


def plans_of(method: str) -> str:
    """nnU-Net's plans identifier that ``method`` trains with."""
    return f"{PLANS}_{PLANS_VARIANTS[method][0]}" if method in PLANS_VARIANTS else PLANS


def write_plans_variant(plans_file: str, variant: str, settings: dict) -> str:
    """Writes the plans ``<plans>_<variant>.json`` beside ``plans_file``: the same plans (and preprocessed data) with
    ``settings`` in every configuration's ``"dmoe"`` block. Returns its path."""
    from nnunet_dmoe.plans.blocks import write_dmoe_block

    with open(plans_file) as f:
        plans = json.load(f)
    plans["plans_name"] = f"{plans['plans_name']}_{variant}"
    for cfg in plans["configurations"].values():
        if "inherits_from" not in cfg:
            write_dmoe_block(cfg, **settings)
    path = os.path.join(os.path.dirname(plans_file), plans["plans_name"] + ".json")
    with open(path, "w") as f:
        json.dump(plans, f, indent=4)
    return path


@command("nnUNetv2_dmoe_demo")
def demo_entry_point():
    from nnunet_dmoe.cli import Parser
    p = Parser(description="Synthetic data -> nnU-Net plan/preprocess -> train baseline, "
                                            "attribute-channel, MoE and dMoE -> predict -> fairness report.")
    p.add_argument("-o", default="demo_output", help="[OPTIONAL] work folder. Default: demo_output")
    p.add_argument("-d", type=int, default=990, help="[OPTIONAL] dataset id. Default: 990")
    p.add_argument("-dim", type=int, default=2, choices=(2, 3), help="[OPTIONAL] 2D or 3D data. Default: 2")
    p.add_argument("-num_train", type=int, default=60, help="[OPTIONAL] training cases. Default: 60")
    p.add_argument("-num_test", type=int, default=40, help="[OPTIONAL] test cases. Default: 40")
    p.add_argument("-size", type=int, nargs="+", default=None,
                   help="[OPTIONAL] image size. Default: 96 96 (2D), 40 40 40 (3D)")
    p.add_argument("-data_seed", type=int, default=0, help="[OPTIONAL] seed of the synthetic data. Default: 0")
    p.add_argument("-epochs", type=int, default=10, help="[OPTIONAL] epochs per training. Default: 10")
    p.add_argument("-iters", type=int, default=50,
                   help="[OPTIONAL] iterations per epoch (5, 10, 25, 50, 100; 0 = nnU-Net's 250). Default: 50")
    p.add_argument("-replicates", type=int, default=1,
                   help="[OPTIONAL] trainings per method (folds 0..r-1, each with its own seed). Default: 1")
    p.add_argument("-methods", nargs="+", default=list(METHODS),
                   help=f"[OPTIONAL] methods to compare, from {' '.join(ALL_METHODS)}. Default: {' '.join(METHODS)}")
    p.add_argument("--all_methods", action="store_true",
                   help="[OPTIONAL] compare every method but the transformers: the four above, the dMoE's variants "
                        f"({' '.join(VARIANTS)}) and the fairness comparators ({' '.join(COMPARATORS)}); about "
                        "four times the default run time")
    p.add_argument("-device", default="cpu", help="[OPTIONAL] cpu or cuda. Default: cpu")
    p.add_renamed("-bootstrap", "--bootstrap", type=int, default=1000,
                  help="[OPTIONAL] bootstrap resamples. Default: 1000")
    p.add_argument("--overwrite", action="store_true", help="[OPTIONAL] replace a run made with other settings")
    a = p.parse_args()
    methods = [m for m in ALL_METHODS if m not in TRANSFORMERS] if a.all_methods else a.methods
    run_demo(a.o, a.d, a.dim, a.num_train, a.num_test, a.size, a.data_seed, a.epochs, a.iters or None,
             a.replicates, methods, a.device, a.bootstrap, a.overwrite)


if __name__ == "__main__":
    demo_entry_point()
