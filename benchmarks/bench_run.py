"""How close does `fxscore run` get to the bare model, and does its memory stay flat?

Prints, in one run on the same images:
  1. bare onnxruntime throughput: session.run on already preprocessed 224x224 batches;
  2. `fxscore run` end-to-end throughput (discover, decode, preprocess, score, write CSV) on
     the same 224x224 JPEGs, on large (2000x2500) 16-bit PNGs and on large DICOM files, each
     with its ratio to (1); goal: >= 90 % on the 224x224 JPEGs at the same threads and batch;
  3. peak RSS of `fxscore run` as a child process on 1k and 10k files;
  4. peak RSS of `fxscore run --workers 8` (and --workers 1) over large images (6000 x 6000 RGB
     PNGs), printed next to the --max-memory budget: it must stay within the budget plus the
     process's own footprint, and not grow with the workers.

The model is a ResNet18-sized network: torchvision resnet18 (random weights) + sigmoid,
exported to a temporary ONNX file with fxscore metadata when torch is importable; otherwise
pass --model PATH. Images are synthetic, generated into a temporary folder; --small-dir takes a
folder of real X-rays for (1) and (2) instead.

    python benchmarks/bench_run.py                      # ~3-5 min on 2 cores
    python benchmarks/bench_run.py --small 1024 --threads 8 --batch-size 64
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fxscore.cli import cli
from fxscore.contract import ModelMeta, Preprocess
from fxscore.files import find_images
from fxscore.cpus import available_cpus
from fxscore.model import load_model
from fxscore.runner import parse_size
from fxscore.scoring import model_input


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, help="fxscore ONNX model (default: export resnet18)")
    ap.add_argument("--small", type=int, default=256, help="224x224 JPEGs [256]")
    ap.add_argument("--small-dir", type=Path, help="use these images instead of synthetic JPEGs")
    ap.add_argument("--large", type=int, default=16, help="2000x2500 PNGs and DICOMs, each [16]")
    ap.add_argument("--rss", default="1000,10000", help="file counts for the RSS runs [1000,10000]")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=available_cpus())
    ap.add_argument("--workers", type=int, default=None, help="decode threads [= threads]")
    ap.add_argument("--repeat", type=int, default=3,
                    help="alternating bare / end-to-end repeats on 224x224, best kept [3]")
    ap.add_argument("--rss-resnet", type=int, default=64,
                    help="files for the ResNet18 peak-RSS run [64]")
    ap.add_argument("--huge", type=int, default=8,
                    help="6000x6000 RGB PNGs for the memory-budget run [8]; 0: skip")
    ap.add_argument("--max-memory", default="512M",
                    help="--max-memory of the memory-budget run [512M]")
    ap.add_argument("--workdir", type=Path, help="keep generated files here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="fxbench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_path = args.model or export_resnet18(work / "resnet18.onnx")
        model = load_model(model_path, threads=args.threads)
        size = model.meta.preprocess.input_size
        print(f"model {model_path} ({model.model_id}), input {size}, threads {args.threads}, "
              f"batch {args.batch_size}, decode workers {args.workers or args.threads}, "
              f"CPUs available {available_cpus()}", flush=True)

        small = args.small_dir or make_jpegs(work / "small", args.small)
        batches = preprocessed_batches(model, small, args.batch_size)
        n_small = sum(len(b) for b in batches)
        # Alternate the two measurements and keep the best of each, so that load from other
        # processes on a shared machine hits both alike.
        bare, e2e = (0.0, 0.0), (0.0, 0.0)  # (img/s, CPU s/img)
        for _ in range(args.repeat):
            bare = max(bare, timed(n_small, bare_run, model, batches))
            e2e = max(e2e, timed(n_small, run_cli, small, model_path, work / "out.csv", args))
        print(f"bare onnxruntime          {bare[0]:8.1f} img/s  {1e3 * bare[1]:7.1f} CPU ms/img  "
              f"({n_small} images, session.run on preprocessed batches)", flush=True)
        del batches

        def report(result: tuple[float, float], label: str, n: int) -> None:
            print(f"fxscore run {label:<13} {result[0]:8.1f} img/s  {1e3 * result[1]:7.1f} CPU "
                  f"ms/img  ({n} files) = {result[0] / bare[0]:6.1%} of bare", flush=True)

        report(e2e, "224x224 JPEG", n_small)
        if args.large:
            for kind in ("png", "dcm"):
                folder = make_large(work / kind, args.large, kind)
                report(timed(args.large, run_cli, folder, model_path, work / "out.csv", args),
                       f"2000x2500 {kind.upper()}", args.large)

        # Memory: the pipeline's footprint on many files. A model whose cost is negligible
        # (global average pool, 224x224 input) keeps 10k files within minutes on 2 cores; the
        # ResNet18 session adds a constant on top (its weights and arena).
        gap = make_gap_model(work / "gap.onnx", size)
        for n in (int(x) for x in args.rss.split(",") if x):
            folder = make_many(work / f"many{n}", n, small)
            rss, secs = child_peak_rss(folder, gap, work / f"rss{n}.csv", args)
            print(f"peak RSS, {n:>6} files     {rss / 2**20:8.1f} MiB  ({secs:.1f} s, "
                  "GAP model)", flush=True)
        if args.rss_resnet:
            folder = make_many(work / f"many{args.rss_resnet}", args.rss_resnet, small)
            rss, secs = child_peak_rss(folder, model_path, work / "rss-resnet.csv", args)
            print(f"peak RSS, {args.rss_resnet:>6} files     {rss / 2**20:8.1f} MiB  "
                  f"({secs:.1f} s, ResNet18)", flush=True)

        # Memory budget: decoded pixels in flight stay under --max-memory, whatever --workers.
        if args.huge:
            folder = make_huge(work / "huge", args.huge)
            budget = parse_size(args.max_memory)
            base, _ = child_peak_rss(make_many(work / "many8", 8, small), gap,
                                     work / "rss-base.csv", args, workers=1)
            for workers in (1, 8):
                rss, secs = child_peak_rss(folder, gap, work / f"rss-huge{workers}.csv", args,
                                           workers=workers, max_memory=args.max_memory)
                print(f"peak RSS, {args.huge} x 6000x6000 RGB PNG, --workers {workers}: "
                      f"{rss / 2**20:7.1f} MiB = process {base / 2**20:.0f} MiB + "
                      f"{(rss - base) / 2**20:.0f} MiB for images; budget --max-memory "
                      f"{args.max_memory} = {budget / 2**20:.0f} MiB ({secs:.1f} s, GAP model)",
                      flush=True)


def export_resnet18(path: Path) -> Path:
    """A random-init ResNet18 exported by fxscore's own exporter: the model users would score."""
    try:
        import torch

        from fxscore.export.onnx_export import ProbabilityModel, to_onnx
        from fxscore.train.model import build_model
    except ImportError:
        sys.exit("torch/torchvision/onnx are not installed: pass --model PATH to an fxscore model")

    torch.manual_seed(0)
    net = ProbabilityModel(build_model("none")).eval()
    meta = ModelMeta(class_names=("fractured", "not fractured"), positive_class="fractured",
                     preprocess=Preprocess(input_size=(224, 224)), model_name="bench-resnet18")
    path.write_bytes(to_onnx(net, meta).SerializeToString())
    return path


def make_gap_model(path: Path, size: tuple[int, int]) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from onnx_models import make_meta, make_model  # noqa: E402 - needs onnx (dev extra)
    return make_model(path, make_meta(preprocess=Preprocess(input_size=size)))


def phantom(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth 'bone' band over a noisy background, values in [0, 1]."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cx = w * rng.uniform(0.3, 0.7)
    bone = np.exp(-((x - cx - 0.1 * (y - h / 2)) / (0.08 * w)) ** 2)
    img = 0.2 + 0.6 * bone + 0.05 * rng.standard_normal((h, w), dtype=np.float32)
    return np.clip(img, 0, 1)


def make_jpegs(folder: Path, n: int) -> Path:
    if folder.exists():
        return folder
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"{i % 8}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray((phantom(rng, 224, 224) * 255).astype(np.uint8)).save(
            sub / f"img{i:05d}.jpg", quality=90)
    return folder


def make_large(folder: Path, n: int, kind: str) -> Path:
    if folder.exists():
        return folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    base = (phantom(rng, 2500, 2000) * 4095).astype(np.uint16)  # 12-bit detector data
    for i in range(n):
        img = np.roll(base, 37 * i, axis=1)
        if kind == "png":
            Image.fromarray(img).save(folder / f"large{i:03d}.png", compress_level=1)
        else:
            write_dicom(folder / f"large{i:03d}.dcm", img)
    return folder


def write_dicom(path: Path, pixels: np.ndarray) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_huge(folder: Path, n: int) -> Path:
    """n 6000 x 6000 RGB PNGs (~140 MiB of pixels each at the peak of a decode): hard links to
    one file, each decoded on its own."""
    if folder.exists():
        return folder
    folder.mkdir(parents=True)
    x = np.arange(6000, dtype=np.uint8)
    rgb = np.empty((6000, 6000, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = x[None, :], x[:, None], x[None, :] ^ x[:, None]
    Image.fromarray(rgb).save(folder / "huge000.png", compress_level=1)
    for i in range(1, n):
        os.link(folder / "huge000.png", folder / f"huge{i:03d}.png")
    return folder


def make_many(folder: Path, n: int, source: Path) -> Path:
    """n files in 100-file folders, hard links to the source images (cheap to make)."""
    if folder.exists():
        return folder
    sources = [p for _, p in find_images(source)]
    for i in range(n):
        sub = folder / f"d{i // 100:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        src, dst = sources[i % len(sources)], sub / f"f{i:06d}{sources[i % len(sources)].suffix}"
        try:
            os.link(src, dst)
        except OSError:
            dst.write_bytes(src.read_bytes())
    return folder


def preprocessed_batches(model, folder: Path, batch_size: int) -> list[np.ndarray]:
    params = model.meta.preprocess
    x = np.stack([model_input(p, params) for _, p in find_images(folder)])
    batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    model.predict(batches[0])  # warm-up: the first run allocates onnxruntime's arena
    return batches


def timed(n: int, fn, *args) -> tuple[float, float]:
    """Run fn(*args); (images per second, CPU seconds of this process per image)."""
    cpu, t = os.times(), time.perf_counter()
    fn(*args)
    wall, cpu_end = time.perf_counter() - t, os.times()
    return n / wall, (cpu_end.user + cpu_end.system - cpu.user - cpu.system) / n


def bare_run(model, batches: list[np.ndarray]) -> None:
    for batch in batches:
        model.predict(batch)


def run_args(folder: Path, model: Path, out: Path, args, workers: int | None = None,
             max_memory: str | None = None) -> list[str]:
    a = ["run", str(folder), "--model", str(model), "--out", str(out), "--overwrite", "--quiet",
         "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    workers = workers or args.workers
    return (a + (["--workers", str(workers)] if workers else [])
            + (["--max-memory", max_memory] if max_memory else []))


def run_cli(folder: Path, model: Path, out: Path, args) -> None:
    """`fxscore run` in this process: no interpreter start-up, model loading included."""
    try:
        cli.main(run_args(folder, model, out, args), standalone_mode=False)
    except SystemExit as e:
        if e.code not in (0, None):
            raise


# Linux carries a process's peak RSS across fork+exec, so a child of this big process would
# report at least our own peak. A small launcher process sits in between and reports its
# child's ru_maxrss (KiB) on its last stderr line.
LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(rc)")


def child_peak_rss(folder: Path, model: Path, out: Path, args, **run_kw) -> tuple[int, float]:
    """Run `python -m fxscore.cli run` as a child process; its peak RSS (bytes) and wall time."""
    cmd = [sys.executable, "-m", "fxscore.cli", *run_args(folder, model, out, args, **run_kw)]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True)
    secs = time.perf_counter() - t
    if proc.returncode not in (0, 3):
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return int(proc.stderr.strip().splitlines()[-1]) * 1024, secs


if __name__ == "__main__":
    main()
