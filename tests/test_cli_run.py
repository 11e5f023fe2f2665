"""`fxscore run` end to end: sample data, real X-rays, shards, resume, errors, and real kills."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fxscore.cli import EXIT_SOME_FAILED, cli

from conftest import SAMPLE_DATA
from onnx_models import make_meta, make_model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


def run(*args, env=None):
    return CliRunner().invoke(cli, ["run", *map(str, args)], env=env)


def read_csv(path_or_text) -> list[dict]:
    text = (path_or_text.read_text(encoding="utf-8", errors="surrogateescape")
            if isinstance(path_or_text, Path) else path_or_text)
    return list(csv.DictReader(io.StringIO(text, newline="")))


def all_files(root: Path) -> set[str]:
    """Every file under root, independently of fxscore's own discovery."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def expected_probability(grey: float) -> float:
    """The tiny model's output for a flat image of intensity `grey` in [0, 1]."""
    pre = make_meta().preprocess
    z = np.mean([(grey - m) / s for m, s in zip(pre.mean, pre.std)])
    return float(1 / (1 + np.exp(-4.0 * z)))


def write_dicom(path: Path, value: int, bits_stored: int, photometric="MONOCHROME2") -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", 40, 30
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.full((40, 30), value, np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_grey(path: Path, grey: int, size: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), grey, np.uint8)).save(path)
    return path


def test_scores_every_sample_file_once(model, tmp_path):
    out = tmp_path / "preds.csv"
    result = run(SAMPLE_DATA, "--model", model, "--out", out)
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    rows = read_csv(out)
    expected = all_files(SAMPLE_DATA) - {"README.md"}
    assert [r["path"] for r in rows] == sorted(expected)  # each once, sorted
    failed = {r["path"] for r in rows if r["error"]}
    assert failed == {p for p in expected if p.startswith("extras/broken/")}
    by_path = {r["path"]: r for r in rows}
    model_id = hashlib.sha256(Path(model).read_bytes()).hexdigest()[:12]
    for r in rows:
        assert r["model_id"] == model_id
        if not r["error"]:
            p = float(r["probability"])
            assert r["label"] == ("fractured" if p >= 0.5 else "not fractured")
            assert r["threshold"] == "0.5"
    # MONOCHROME1 is inverted after windowing, so it scores like its MONOCHROME2 twin
    assert float(by_path["extras/mono1_12bit.dcm"]["probability"]) == pytest.approx(
        float(by_path["extras/mono2_12bit.dcm"]["probability"]), abs=1e-4)
    assert "IM0001" in {Path(p).name for p in by_path}
    counts = f"{len(expected) - len(failed)} scored, {len(failed)} failed, 1 ignored"
    assert counts in result.stderr
    assert "\r" not in result.stderr  # no progress bar when stderr is not a terminal



def test_readme_main_job_with_the_shipped_model(tmp_path):
    """README: `fxscore run sample_data --out preds.csv`, no --model, as a real process."""
    env = {k: v for k, v in os.environ.items() if k != "FXSCORE_MODEL"}
    out = tmp_path / "preds.csv"
    proc = subprocess.run([sys.executable, "-m", "fxscore.cli", "run", str(SAMPLE_DATA),
                           "--out", str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == EXIT_SOME_FAILED, proc.stderr  # extras/broken/ are error rows
    rows = read_csv(out)
    assert [r["path"] for r in rows] == sorted(all_files(SAMPLE_DATA) - {"README.md"})
    scored = [r for r in rows if not r["error"]]
    assert len(scored) == len(rows) - 3
    assert {r["label"] for r in scored} <= {"fractured", "not fractured"}
    assert len({r["model_id"] for r in rows}) == 1


def test_generated_dicom_and_16_bit_files(model, tmp_path):
    """Bit depth reaches the model: values are scaled by their depth, never clipped to 8 bits."""
    root = tmp_path / "in"
    write_dicom(root / "dicom" / "bright.dcm", 3500, bits_stored=12)  # 3500/4095
    write_dicom(root / "dicom" / "IM0002", 9000, bits_stored=16)  # no suffix: DICM marker
    write_dicom(root / "dicom" / "1.2.840.1234.5", 900, bits_stored=12, photometric="MONOCHROME1")
    Image.fromarray(np.full((40, 30), 40000, np.uint16)).save(root / "png16.png")
    Image.fromarray(np.full((40, 30), 700, np.uint16)).save(root / "PNG16-DARK.PNG")
    write_grey(root / ".hidden" / "skip.png", 255)
    write_grey(root / ".skip.png", 255)
    (root / "dicom" / "loop").symlink_to("..")  # must terminate, scoring nothing twice
    result = run(root, "-m", model, "--out", "-", "--batch-size", 2)
    assert result.exit_code == 0, result.output
    rows = {r["path"]: r for r in read_csv(result.stdout)}
    expected = {"dicom/bright.dcm": 3500 / 4095, "dicom/IM0002": 9000 / 65535,
                "dicom/1.2.840.1234.5": 1 - 900 / 4095, "png16.png": 40000 / 65535,
                "PNG16-DARK.PNG": 700 / 65535}
    assert set(rows) == set(expected)
    for path, grey in expected.items():
        assert float(rows[path]["probability"]) == pytest.approx(expected_probability(grey),
                                                                 abs=2e-3), path
    assert rows["dicom/bright.dcm"]["label"] == "fractured"
    assert rows["dicom/IM0002"]["label"] == "not fractured"


def test_stdout_and_jsonl(model, tmp_path):
    src = SAMPLE_DATA / "test"
    result = run(src, "-m", model, "--out", "-", "--format", "jsonl")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == sorted(all_files(src))
    assert "scored" not in result.stdout and "scored" in result.stderr  # summary on stderr
    # the .jsonl suffix picks the format; the same numbers as the CSV to stdout
    run(src, "-m", model, "--out", tmp_path / "p.jsonl")
    from_file = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert from_file == records
    as_csv = read_csv(run(src, "-m", model, "-q").stdout)
    assert [float(r["probability"]) for r in as_csv] == [r["probability"] for r in records]


def test_single_file_input(model):
    path = SAMPLE_DATA / "extras" / "mono2_12bit.dcm"
    result = run(path, "-m", model)
    assert result.exit_code == 0
    assert [r["path"] for r in read_csv(result.stdout)] == ["mono2_12bit.dcm"]


def test_shards_together_are_the_full_run(model, tmp_path):
    src = SAMPLE_DATA / "train"
    full = {r["path"]: r for r in read_csv(run(src, "-m", model).stdout)}
    seen: list[str] = []
    for k in (1, 2, 3):
        result = run(src, "-m", model, "--shard", f"{k}/3", "--out", tmp_path / f"s{k}.csv")
        assert result.exit_code == 0
        rows = read_csv(tmp_path / f"s{k}.csv")
        assert 0 < len(rows) < len(full)
        for r in rows:
            assert r == full[r["path"]]
        seen += [r["path"] for r in rows]
    assert sorted(seen) == sorted(full)  # disjoint, and together everything


@pytest.mark.parametrize("shard", ["0/3", "4/3", "3", "a/b", "1/0"])
def test_bad_shard_is_a_usage_error(model, shard):
    result = run(SAMPLE_DATA, "-m", model, "--shard", shard)
    assert result.exit_code == 2
    assert "K/N" in result.output and "Traceback" not in result.output


def test_resume_and_overwrite(model, tmp_path):
    src = tmp_path / "in"
    for i in range(40):
        write_grey(src / f"{i % 3}" / f"g{i:02d}.png", 6 * i)
    out = tmp_path / "preds.csv"
    assert run(src, "-m", model, "--out", out, "--batch-size", 8).exit_code == 0
    complete = out.read_bytes()
    # as if killed in the middle of writing row 11
    lines = complete.split(b"\n")
    out.write_bytes(b"\n".join(lines[:11]) + b"\n" + lines[11][:9])
    result = run(src, "-m", model, "--out", out, "--batch-size", 8)
    assert result.exit_code == 0, result.output
    assert "removed a half-written last row" in result.stderr
    assert "30 scored, 0 failed, 0 ignored (not X-ray files), 10 already in" in result.stderr
    assert out.read_bytes() == complete
    # nothing left to do: nothing appended
    result = run(src, "-m", model, "--out", out)
    assert result.exit_code == 0 and "0 scored" in result.stderr
    assert out.read_bytes() == complete
    # another model's file is refused, and --overwrite starts afresh
    other = make_model(tmp_path / "other.onnx", weight=-4.0)
    result = run(src, "-m", other, "--out", out)
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert "Traceback" not in result.output and out.read_bytes() == complete
    assert run(src, "-m", other, "--out", out, "--overwrite").exit_code == 0
    rows = read_csv(out)
    assert len(rows) == 40 and len({r["model_id"] for r in rows}) == 1
    assert rows[0]["model_id"] != read_csv(complete.decode())[0]["model_id"]


def test_earlier_failures_still_give_exit_3(model, tmp_path):
    out = tmp_path / "p.csv"
    assert run(SAMPLE_DATA / "extras", "-m", model, "--out", out).exit_code == EXIT_SOME_FAILED
    result = run(SAMPLE_DATA / "extras", "-m", model, "--out", out)
    assert result.exit_code == EXIT_SOME_FAILED
    assert "3 file(s) could not be read" in result.stderr


def test_unlistable_folder_warns_and_gives_exit_3(model, tmp_path, monkeypatch):
    write_grey(tmp_path / "ok" / "a.png", 10)
    write_grey(tmp_path / "locked" / "b.png", 10)
    scandir = os.scandir

    def refuse(path):  # chmod would not stop root; refuse the listing itself
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    result = run(tmp_path, "-m", model)
    assert result.exit_code == EXIT_SOME_FAILED
    assert [r["path"] for r in read_csv(result.stdout)] == ["ok/a.png"]
    assert "cannot list" in result.stderr and "1 folder(s) could not be listed" in result.stderr


def _no_meta(p):
    make_model(p, with_meta=False)


def _bad_meta(p):
    make_model(p, props={"fxscore": json.dumps({**make_meta().to_dict(), "resize": "nearest"})})


def _wrong_size(p):
    make_model(p, props={"fxscore": json.dumps({**make_meta().to_dict(), "input_size": [99, 99]})})


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text("not a model"), "is not a valid ONNX model"),
    (_no_meta, "carries no fxscore metadata"),
    (_bad_meta, "resize must be one of"),
    (_wrong_size, "disagrees with its metadata"),
], ids=["missing", "not onnx", "no metadata", "bad metadata", "wrong input size"])
def test_model_errors_are_clear(tmp_path, make, message):
    path = tmp_path / "model.onnx"
    make(path)
    result = run(SAMPLE_DATA / "test", "--model", path, "--out", tmp_path / "p.csv")
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "p.csv").exists()


def test_model_from_environment_or_nowhere(model, tmp_path, monkeypatch):
    result = run(SAMPLE_DATA / "test", env={"FXSCORE_MODEL": str(model)})
    assert result.exit_code == 0 and len(read_csv(result.stdout)) == 40
    from fxscore import model as model_module
    monkeypatch.setattr(model_module.resources, "files", lambda package: tmp_path)  # no default
    result = run(SAMPLE_DATA / "test", env={"FXSCORE_MODEL": ""})
    assert result.exit_code == 1 and "pass --model PATH" in result.output


@pytest.mark.parametrize("args, message", [
    (["--provider", "cuda"], "CUDAExecutionProvider"),
    (["--out", "/nonexistent/dir/p.csv"], "cannot write"),
])
def test_other_fatal_errors(model, args, message):
    if "cuda" in args:
        import onnxruntime
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            pytest.skip("CUDA is installed here")
    result = run(SAMPLE_DATA / "test", "-m", model, *args)
    assert result.exit_code == 1 and message in result.output


def test_missing_input_is_fatal(model, tmp_path):
    result = run(tmp_path / "nope", "-m", model)
    assert result.exit_code == 1 and "does not exist" in result.output


def test_help_has_examples_and_exit_codes():
    result = CliRunner().invoke(cli, ["run", "--help"])
    assert result.exit_code == 0
    for text in ("fxscore run ./xrays --model model.onnx --out preds.csv", "--shard",
                 "Exit codes: 0", "3 finished", "K counted from 1", "--overwrite"):
        assert text in result.output


@pytest.mark.realdata
def test_real_test_split(real_data_root, model, tmp_path):
    """The real test split: every file exactly once; truncated JPEGs become error rows."""
    split = real_data_root / "test"
    out = tmp_path / "real.csv"
    result = run(split, "-m", model, "--out", out, "--batch-size", 16)
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    rows = read_csv(out)
    files = all_files(split)
    assert len(files) == 340 and sorted(r["path"] for r in rows) == sorted(files)
    failed = [r for r in rows if r["error"]]
    assert failed and all("truncated" in r["error"] for r in failed)
    for r in failed:  # independently: a complete JPEG ends with the EOI marker
        assert not (split / r["path"]).read_bytes().rstrip(b"\0").endswith(b"\xff\xd9")


@pytest.mark.realdata
def test_real_misnamed_and_odd_mode_files(real_data_root, model, tmp_path):
    """PNGs named .jpg, RGBA and palette images from the real train split all score."""
    picked = tmp_path / "picked"
    picked.mkdir()
    kinds = {"misnamed": 0, "rgba": 0, "palette": 0}
    for path in sorted((real_data_root / "train").rglob("*")):
        head = path.read_bytes()[:26] if path.is_file() else b""
        if not head.startswith(b"\x89PNG"):
            continue
        kind = ("misnamed" if path.suffix.lower() != ".png" else
                {6: "rgba", 3: "palette"}.get(head[25]))  # PNG IHDR colour type
        if kind and kinds[kind] < 3:
            kinds[kind] += 1
            os.link(path, picked / f"{kind}{kinds[kind]}{path.suffix}")
    assert all(kinds.values()), kinds
    result = run(picked, "-m", model, "--out", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    assert len(read_csv(tmp_path / "p.csv")) == sum(kinds.values())


def _cmd(src: Path, model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "fxscore.cli", "run", str(src), "-m", str(model),
            "--out", str(out), "--batch-size", "8", "--threads", "1", "--workers", "1"]


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


@pytest.mark.slow
def test_killed_runs_resume_to_exactly_one_row_per_file(model, tmp_path):
    """SIGKILL a real `fxscore run` at random moments; reruns complete it, every file once."""
    src = tmp_path / "in"
    rng = np.random.default_rng(0)
    for i in range(400):
        write_grey(src / f"d{i % 4}" / f"img{i:03d}.png", int(rng.integers(0, 256)), size=96)
    out = tmp_path / "preds.csv"
    cmd = _cmd(src, model, out) + ["--quiet"]
    delays = random.Random(1234)
    full_size = 400 * len("d0/img000.png,0.123456,not fractured,0.5,0123456789ab,\n")
    kills = 0
    for _ in range(20):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        if delays.random() < 0.2:  # anywhere, start-up and header writing included
            time.sleep(delays.uniform(0.0, 1.0))
        else:  # after a random share of the rows, at a random moment within a batch
            target = _size(out) + delays.uniform(0.05, 0.2) * full_size
            while proc.poll() is None and _size(out) < target and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(delays.uniform(0.0, 0.01))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        kills += 1
    assert kills >= 3
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    rows = read_csv(out)
    assert sorted(r["path"] for r in rows) == sorted(all_files(src))  # none lost, none twice
    assert all(r["error"] == "" and r["probability"] for r in rows)
    assert out.read_text().count("path,probability") == 1


def test_progress_only_on_a_terminal(model, tmp_path):
    import pty

    src = tmp_path / "in"
    for i in range(120):
        write_grey(src / f"g{i:03d}.png", i, size=96)
    master, slave = pty.openpty()
    proc = subprocess.run(_cmd(src, model, tmp_path / "p.csv"), stdout=subprocess.DEVNULL,
                          stderr=slave, timeout=120)
    os.close(slave)
    seen = b""
    try:
        while chunk := os.read(master, 4096):
            seen += chunk
    except OSError:  # EIO: the terminal's other side is closed
        pass
    os.close(master)
    assert proc.returncode == 0
    assert b"\r" in seen and b"files" in seen and b"/s" in seen and b"120 scored" in seen
