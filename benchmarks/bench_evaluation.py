"""Times the fairness report on the 150 PI-CAI whole-gland cases with 1000 bootstrap resamples.

Target: within 60 s on the 2-core development machine. Not a test; run it by hand:

    .venv/bin/python benchmarks/bench_evaluation.py [--repeats 3] [-np 1] [--data tests/data/picai_wholegland]

Prints the time of each run (reading + scoring, bootstrap, writing the four files) and the median.
"""
import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

from nnunet_dmoe.evaluation import attributes_from_table, evaluate_folders


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # default: the real test data in the repository
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "tests" / "data"
                                              / "picai_wholegland"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("-bootstrap", type=int, default=1000)
    parser.add_argument("-np", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = os.path.join(tmp, "attributes.csv")
        with open(os.path.join(args.data, "marksheet.csv"), newline="") as f, open(table, "w", newline="") as g:
            w = csv.writer(g)
            w.writerow(["case", "center"])
            for r in csv.DictReader(f):
                w.writerow([f"{r['patient_id']}_{r['study_id']}", r["center"]])
        attributes = attributes_from_table(table, "case", "center")
        times = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            s = evaluate_folders(os.path.join(args.data, "reference"), os.path.join(args.data, "automatic"), [1],
                                 attributes, os.path.join(tmp, f"out{i}"), n_boot=args.bootstrap, seed=0,
                                 num_processes=args.np)
            times.append(time.perf_counter() - t0)
            print(f"run {i + 1}: {times[-1]:.1f} s ({s['n_cases']} cases, {args.bootstrap} resamples, -np {args.np})")
    print(f"median: {statistics.median(times):.1f} s")


if __name__ == "__main__":
    main()
