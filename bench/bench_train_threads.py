"""The trainer's CPU threads: the same tiny run (image folders decoded on the fly by 2 data loader workers) with
torch's default thread count against the trainer's own choice (cores minus workers on a CPU), side by side in one
run, each in a fresh process.

    python bench/bench_train_threads.py [--steps 40] [--workers 2] [--repeats 2]

"Before" sets OMP_NUM_THREADS to the thread count torch picks by itself in a fresh process (what the trainer used
until it chose its own; it keeps an OMP_NUM_THREADS the user sets), "after" leaves it unset so the trainer picks.
Images/s come from metrics.jsonl: images trained between step 5 and the last step over the time between them (the
first steps load workers and warm up). The tiny models are the trainer tests' own (tests/train/conftest.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WARM_STEPS = 5


def make_inputs(folder: Path, steps: int, workers: int) -> Path:
    from tests.tiny_llms import make_t5
    from tests.train.conftest import make_base, make_caption_folder, write_config

    base = make_base(folder / "tiny-sd15")
    llm = make_t5(folder / "tiny-t5")
    images = make_caption_folder(folder / "images", count=32, sizes=[(96, 96), (128, 80)])
    return write_config(folder / "run.toml", base=base, llm=llm, images=images, output=folder / "out",
                        data={"resolution": 64, "bucket_step": 16, "bucketing": False},
                        train={"steps": steps, "batch_size": 4, "workers": workers, "save_precision": "fp32"})


def default_threads() -> int:
    code = "import torch; print(torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout)


def run(config: Path, omp: str | None) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-m", "ella_ext.train", "train", "--config", str(config), "--overwrite"],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    threads_line = next((line for line in done.stderr.splitlines() if "CPU thread" in line), "")
    lines = [json.loads(line) for line in (config.parent / "out" / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in lines if m["step"] == WARM_STEPS)
    last = lines[-1]
    return (last["images"] - first["images"]) / (last["elapsed_s"] - first["elapsed_s"]), threads_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    before_threads = default_threads()
    with tempfile.TemporaryDirectory() as folder:
        config = make_inputs(Path(folder), args.steps, args.workers)
        results = {"before": [], "after": []}
        lines = {}
        for _ in range(args.repeats):  # alternating, so both see the same load over time
            for name, omp in (("before", str(before_threads)), ("after", None)):
                speed, lines[name] = run(config, omp)
                results[name].append(speed)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{cores} core(s), load average {load:.1f} at the end; torch {torch.__version__}; {args.steps} steps of "
          f"batch 4 at 64 px, {args.workers} data loader workers, {args.repeats} run(s) each, alternating\n")
    print("| threads | images/s (median) | runs | the trainer's log line |")
    print("|---|---|---|---|")
    for name, label in (("before", f"torch's default ({before_threads})"), ("after", "the trainer's choice")):
        runs = ", ".join(f"{s:.2f}" for s in results[name])
        print(f"| {label} | {statistics.median(results[name]):.2f} | {runs} | {lines[name].strip()} |")
    print(f"\nspeed-up: {statistics.median(results['after']) / statistics.median(results['before']):.2f}x")


if __name__ == "__main__":
    main()
