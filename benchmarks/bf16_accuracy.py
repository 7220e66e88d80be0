"""Accuracy cost of bf16 autocast on the digits GenDD run: fp32 vs bf16, same seeds, same cached teacher.

Runs `gendd-train experiment=digits/gendd seed=S trainer.precision=P` for P in fp32, bf16 and the given
seeds (one thread per job, `--jobs` at a time; a run dir that already has summary.json is reused), then
tabulates the test accuracy of the `generative` and `student` outputs (best-on-val checkpoints) and the
mean fp32 − bf16 difference over the seeds.

    python benchmarks/bf16_accuracy.py                 # seeds 0 1 2, ~15 min on 2 cores
    python benchmarks/bf16_accuracy.py --seeds 0 1 2 3 4
    python benchmarks/bf16_accuracy.py --runs DIR      # reuse DIR/<precision>_s<seed> run folders
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import BIN, SCRATCH, machine_info, md_table, results_dir, train_env, write_outputs

PRECISIONS = ("fp32", "bf16")
OUTPUTS = ("generative", "student")


def train(run_dir: Path, seed: int, precision: str, env: dict[str, str]) -> None:
    if (run_dir / "summary.json").is_file():
        return
    cmd = [
        str(BIN / "gendd-train"),
        "experiment=digits/gendd",
        f"seed={seed}",
        f"trainer.precision={precision}",
        "trainer.progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    log = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default=str(SCRATCH / "bf16_accuracy"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args()
    root, env, started = Path(args.runs), train_env(), time.perf_counter()
    # the first run trains (or finds) the cached digits teacher alone; the rest share it
    jobs = [(root / f"{p}_s{s}", s, p) for s in args.seeds for p in PRECISIONS]
    train(*jobs[0], env)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: train(*job, env), jobs[1:]))
    acc = {p: {o: [] for o in OUTPUTS} for p in PRECISIONS}
    for run_dir, _, precision in jobs:
        test = json.loads((run_dir / "summary.json").read_text())["distill"]["test"]
        for output in OUTPUTS:
            acc[precision][output].append(round(test[f"acc/{output}"], 2))
    rows, data = [], {"seeds": args.seeds, "accuracy": acc, "runs": str(root)}
    for output in OUTPUTS:
        f32, b16 = acc["fp32"][output], acc["bf16"][output]
        cost = statistics.mean(f32) - statistics.mean(b16)
        data[f"cost_{output}"] = round(cost, 3)
        rows.append([output, f"{statistics.mean(f32):.2f} ({', '.join(map(str, f32))})",
                     f"{statistics.mean(b16):.2f} ({', '.join(map(str, b16))})", f"{cost:+.2f}"])  # fmt: skip
    text = (
        "## bf16 autocast accuracy cost, digits GenDD (experiment=digits/gendd)\n\n"
        f"Test accuracy (%) of the best-on-val checkpoint, seeds {args.seeds}, one cached teacher; "
        "cost = mean fp32 − mean bf16 (positive: bf16 is worse).\n\n"
        + md_table(["output", "fp32 mean (per seed)", "bf16 mean (per seed)", "cost (pt)"], rows)
        + f"\n\nRun folders: {root} (runs with a summary.json are reused, not retrained); this "
        f"invocation took {time.perf_counter() - started:.0f} s."
    )
    data["machine"] = machine_info()
    write_outputs(results_dir(False, args.results_dir), "bf16_accuracy", text, data)


if __name__ == "__main__":
    main()
