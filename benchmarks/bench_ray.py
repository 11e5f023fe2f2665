"""What does Ray cost on one machine, and where would the driver become the bottleneck?

Prints, in one run on the same files:
  1. `fxscore run` single process vs `fxscore run --ray` on a local Ray cluster, side by side
     (alternating, best of --repeat each, so that load from other processes hits both alike).
     Ray is timed from the call of the job to its end, after the cluster has started: listing,
     the spill file, dataset planning, starting the actor pool and the model in every actor
     are included (the price of the engine), starting the cluster is not (paid once per
     cluster). Goal: Ray >= 85 % of single-process throughput. Several actor layouts
     (actors x CPUs each) are measured;
  2. the driver's writer ceiling: rows/s the driver can take in and write (unpickle, dedupe,
     format, append, fsync per batch), with no scoring at all. Divided by one node's
     throughput it says at how many nodes the driver would become the bottleneck.

Files: the real X-rays of ../shared/data (all splits, --files of them), else synthetic
224x224 JPEGs. Model: the packaged default model (int8 ResNet18), or --model.

    python benchmarks/bench_ray.py                    # ~5 min on 2 cores
    python benchmarks/bench_ray.py --files 2000 --layouts 1x2,2x1 --repeat 3
"""
from __future__ import annotations

import argparse
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fxscore import proctree

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = Path(os.environ.get("FXSCORE_REAL_DATA",
                                REPO.parent / "shared" / "data" / "fracture-multi-region"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, help="fxscore ONNX model [the packaged default]")
    ap.add_argument("--files", type=int, default=600, help="files to score [600]")
    ap.add_argument("--layouts", default="1x2,2x1",
                    help="Ray actor layouts ACTORSxCPUS, comma-separated [1x2,2x1]")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray cluster and "
                    "threads of the single process [all this process may use]")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs, best kept [2]")
    ap.add_argument("--writer-rows", type=int, default=200_000,
                    help="rows for the writer ceiling [200000]")
    ap.add_argument("--workdir", type=Path, help="keep generated files here")
    args = ap.parse_args()

    from fxscore.cpus import available_cpus
    from fxscore.model import load_model
    from fxscore.rayrun import RaySettings, RayStats, ray_cluster, run_on_ray
    from fxscore.runner import run_job

    cpus = args.cpus or available_cpus()
    layouts = [tuple(int(x) for x in layout.split("x")) for layout in args.layouts.split(",")]
    with tempfile.TemporaryDirectory(prefix="fxbench-ray-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        files, what = input_files(work / "input", args.files)
        model = load_model(args.model, threads=cpus)
        print(f"CPU: {cpu_model()}; {cpus} CPUs used of {os.cpu_count()}; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        print(f"model {model.path.name} ({model.model_id}), batch {args.batch_size}; "
              f"{files} files ({what})", flush=True)

        def single() -> tuple[float, float]:
            # this process only: the idle cluster's own processes are not the job's
            with TreeCPU(tree=False) as cpu:
                s = run_job(model, work / "input", str(work / "single.csv"), overwrite=True,
                            batch_size=args.batch_size, workers=cpus)
            assert s.scored + s.failed == files, s
            return s.total_s, cpu.seconds

        def on_ray(actors: int, actor_cpus: int, stats: RayStats) -> tuple[float, float]:
            settings = RaySettings(actors=(actors, actors), actor_cpus=actor_cpus)
            with TreeCPU() as cpu:
                s = run_on_ray(model, work / "input", str(work / "ray.csv"), overwrite=True,
                               batch_size=args.batch_size, settings=settings, stats=stats)
            assert s.scored + s.failed == files, s
            return s.total_s, cpu.seconds

        t = time.monotonic()
        with ray_cluster("local", cpus=cpus):
            started = time.monotonic() - t
            print(f"local Ray cluster started in {started:.1f} s (not counted below)", flush=True)
            best_single = (float("inf"), float("inf"))  # (wall s, CPU s), each the best
            best_ray = {layout: (float("inf"), float("inf"), None) for layout in layouts}
            for _ in range(args.repeat):
                wall, cpu = single()
                best_single = (min(best_single[0], wall), min(best_single[1], cpu))
                for layout in layouts:
                    stats = RayStats()
                    wall, cpu = on_ray(*layout, stats)
                    old = best_ray[layout]
                    best_ray[layout] = (min(old[0], wall), min(old[1], cpu),
                                        stats if wall < old[0] else old[2])
        same = sorted(open(work / "single.csv")) == sorted(open(work / "ray.csv"))

        single_rate, single_cpu = files / best_single[0], best_single[1] / files
        print(f"\nsingle process     {single_rate:7.1f} files/s  {1e3 * single_cpu:6.1f} CPU ms/file"
              f"  ({best_single[0]:6.1f} s, {cpus} threads)")
        for (actors, actor_cpus), (seconds, cpu_s, stats) in best_ray.items():
            rate, cpu = files / seconds, cpu_s / files
            print(f"ray {actors} x {actor_cpus} CPU      {rate:7.1f} files/s  {1e3 * cpu:6.1f} CPU ms/file"
                  f"  ({seconds:6.1f} s; first rows after {stats.first_row_s:.1f} s)  = "
                  f"{100 * rate / single_rate:5.1f} % of single-process throughput, "
                  f"{100 * single_cpu / cpu:5.1f} % of its CPU efficiency")
        print("(CPU: the single process; for Ray every process of the cluster, driver and "
              "actors included, sampled from /proc. On a machine shared with other jobs the "
              "kernel gives each process its share, so Ray's several processes get more CPU "
              "than one: there the CPU ratio is the fairer one)")
        print(f"rows identical (last runs, as sorted lines): {same}")

        writer_rate = writer_ceiling(work / "ceiling.csv", args.writer_rows, model.model_id)
        best_rate = max(files / seconds for seconds, *_ in best_ray.values())
        print(f"\ndriver writer ceiling {writer_rate:9,.0f} rows/s (unpickle, dedupe, CSV, "
              f"append + fsync per {TASK_ROWS}-row batch, {args.writer_rows:,} rows)")
        print(f"  = {writer_rate / best_rate:,.0f} x this machine's Ray throughput: the driver "
              f"would bound a cluster of about {writer_rate / best_rate:,.0f} nodes like this one")


TASK_ROWS = 256  # rows per batch in the writer ceiling: a full Ray task's worth


def writer_ceiling(out: Path, n: int, model_id: str) -> float:
    """Rows/s of the driver's side alone: what RayScore and run_job do with each row."""
    from fxscore.output import RunIdentity, open_output

    rows = [pickle.dumps({"path": f"study{i // 100:05d}/series1/image{i:07d}.dcm",
                          "probability": (i % 997) / 997, "label": "fractured" if i % 3 else
                          "not fractured", "threshold": 0.5, "model_id": model_id,
                          "sha256": f"{i:064x}", "error": ""}) for i in range(TASK_ROWS)]
    writer, _ = open_output(str(out), "csv", RunIdentity(model_id, 0.5, out.parent),
                            overwrite=True)
    done = bytearray(n // 8 + 1)
    t = time.perf_counter()
    try:
        for start in range(0, n, TASK_ROWS):
            batch = []
            for k, blob in enumerate(rows):
                i = start + k
                if i >= n:
                    break
                row = pickle.loads(blob)
                if done[i >> 3] & (1 << (i & 7)):
                    continue
                done[i >> 3] |= 1 << (i & 7)
                row["path"] = f"{start}/{row['path']}"  # distinct paths, as in a real run
                batch.append(row)
            writer.write_batch(batch)
    finally:
        writer.close()
    return n / (time.perf_counter() - t)


class TreeCPU:
    """CPU seconds used by this process and its descendants while the `with` block runs.

    Ray's actors exit at the end of a run and nobody may reap them with accounting (their time
    would vanish from the tree), so the tree is sampled every 0.2 s and each process counts
    with the last CPU time seen for it; a process's time after its last sample is lost (at
    most 0.2 s each). `tree=False`: this process only (its threads included).
    """

    def __init__(self, tree: bool = True) -> None:
        self.tree, self.seconds = tree, 0.0
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()

    def _sample(self) -> dict[int, float]:
        pids = proctree.descendants(os.getpid()) if self.tree else []
        out = {}
        for pid in [os.getpid(), *pids]:
            fields = proctree.stat(pid)
            if fields is not None:
                out[pid] = (int(fields[proctree.UTIME]) + int(fields[proctree.STIME])) \
                    / proctree.TICKS
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._last.update(self._sample())

    def __enter__(self) -> "TreeCPU":
        self._first = self._sample()
        self._last = dict(self._first)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(self._sample())
        self.seconds = sum(cpu - self._first.get(pid, 0.0) for pid, cpu in self._last.items())


def input_files(dest: Path, n: int) -> tuple[int, str]:
    """Hard links to n real X-rays (all splits), else n synthetic JPEGs."""
    dest.mkdir(parents=True, exist_ok=True)
    if (REAL_DATA / "manifest.csv").exists():
        laid = dest.parent / "laid"
        if not laid.exists():
            subprocess.run([sys.executable, str(REAL_DATA / "materialize"), str(laid)],
                           check=True, capture_output=True)
        picked = sorted(p for p in laid.rglob("*") if p.is_file())[:n]
        for i, p in enumerate(picked):
            target = dest / f"{i:05d}{p.suffix.lower()}"
            if not target.exists():
                os.link(p, target)
        return len(picked), f"real X-rays from {REAL_DATA.name}, all splits"
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (224, 224), dtype=np.uint8)).save(dest / f"{i:05d}.jpg")
    return n, "synthetic 224x224 JPEGs"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
