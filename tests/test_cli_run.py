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

from fxscore import proctree
from fxscore.cli import EXIT_SOME_FAILED, cli

from conftest import SAMPLE_DATA, small_tmpfs
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
    ds.Modality, ds.Rows, ds.Columns = "DX", 40, 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.full((40, 32), value, np.uint16).tobytes()
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
    Image.fromarray(np.full((40, 32), 40000, np.uint16)).save(root / "png16.png")
    Image.fromarray(np.full((40, 32), 700, np.uint16)).save(root / "PNG16-DARK.PNG")
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
    assert "30 scored, 0 failed, 0 ignored, 10 already in" in result.stderr
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


def test_a_plain_run_imports_only_what_scoring_needs(model, tmp_path):
    """Start-up (bench_run.py): a run of PNGs and JPEGs logging to a file imports neither tqdm
    (its package imports importlib.metadata: ~30 ms; only a terminal's bar needs it), nor
    multiprocessing (only compressed DICOM is decoded in worker processes), nor the Ray
    machinery, nor importlib.resources (only the packaged default model is found with it)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted((SAMPLE_DATA / "test").rglob("*"))[:40]:
        if p.suffix in (".png", ".jpg"):
            (folder / p.name).write_bytes(p.read_bytes())
    heavy = ("tqdm", "importlib.metadata", "multiprocessing", "fxscore.rayrun",
             "importlib.resources")
    code = ("import sys; from fxscore.cli import cli\n"
            f"try: cli.main(['run', {str(folder)!r}, '--model', {str(model)!r}, '--out', "
            f"{str(tmp_path / 'x.csv')!r}])\n"
            "except SystemExit as e: assert e.code in (0, None), e.code\n"
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "scoring:" in done.stderr  # the plain progress line: a log got its progress
    assert done.stdout.strip() == ""


def test_model_from_environment_or_nowhere(model, tmp_path, monkeypatch):
    result = run(SAMPLE_DATA / "test", env={"FXSCORE_MODEL": str(model)})
    assert result.exit_code == 0 and len(read_csv(result.stdout)) == 40
    from fxscore import model as model_module
    monkeypatch.setattr(model_module, "packaged_model",  # an fxscore without a default model
                        lambda: (tmp_path / "default.onnx", "0" * 64))
    result = run(SAMPLE_DATA / "test", env={"FXSCORE_MODEL": ""})
    assert result.exit_code == 1 and "pass --model PATH" in result.output


@pytest.mark.parametrize("args, message", [
    (["--provider", "cuda"], "CUDAExecutionProvider"),
    (["--out", "/dev/null/sub/p.csv"], "cannot create the folder of --out"),
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
    full_size = 400 * len("d0/img000.png,0.123456,not fractured,0.5,0123456789ab,%s,\n" % ("0" * 64))
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
    import fcntl
    import struct
    import termios
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
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
    assert b"\r" in seen and b"/120" in seen and b"file/s" in seen and b"120 scored" in seen
    assert b"ETA" in seen or b"<" in seen  # tqdm: elapsed<remaining


# ---- options of issue 11 and 13: threshold, exit 5, ignored files, links, summary -------------

@pytest.mark.parametrize("out", ["p.parquet", "p.tsv", "p.xlsx"])
def test_unknown_out_extension_is_refused(model, tmp_path, out):
    result = run(SAMPLE_DATA / "test", "-m", model, "--out", tmp_path / "sub" / out)
    assert result.exit_code == 2 and "fxscore writes CSV (.csv) or JSON lines" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "sub").exists()


def test_out_extension_and_format_must_agree(model, tmp_path):
    result = run(SAMPLE_DATA / "test", "-m", model, "--out", tmp_path / "p.csv", "--format", "jsonl")
    assert result.exit_code == 2 and "--format is jsonl" in result.output


def test_out_folders_are_created(model, tmp_path):
    out = tmp_path / "a" / "b" / "preds.jsonl"
    assert run(SAMPLE_DATA / "test", "-m", model, "--out", out).exit_code == 0
    assert len(out.read_text().splitlines()) == 40


def test_threshold_is_the_users_and_resume_keeps_it(model, tmp_path):
    src = tmp_path / "in"
    for g in (60, 128, 200):
        write_grey(src / f"g{g}.png", g)
    probs = {r["path"]: float(r["probability"]) for r in read_csv(run(src, "-m", model).stdout)}
    low, mid, _ = sorted(probs.values())
    t = round((low + mid) / 2, 4)  # between two of them: one label flips against 0.5's
    out = tmp_path / "p.csv"
    result = run(src, "-m", model, "--out", out, "--threshold", t)
    assert result.exit_code == 0 and f"threshold {t:g}" in result.stderr
    rows = read_csv(out)
    assert {r["threshold"] for r in rows} == {repr(float(t))}
    assert [r["label"] for r in rows] == ["fractured" if probs[r["path"]] >= t else
                                          "not fractured" for r in rows]
    assert sorted(r["label"] for r in rows) == ["fractured", "fractured", "not fractured"]
    result = run(src, "-m", model, "--out", out)  # the model's 0.5: refused, file untouched
    assert result.exit_code == 1 and "threshold" in result.output and "--overwrite" in result.output
    assert run(src, "-m", model, "--out", out, "--threshold", t).exit_code == 0
    assert len(read_csv(out)) == 3


@pytest.mark.parametrize("threshold", ["-0.1", "1.5", "x"])
def test_bad_threshold_is_a_usage_error(model, threshold):
    assert run(SAMPLE_DATA / "test", "-m", model, "--threshold", threshold).exit_code == 2


def test_another_input_folder_with_the_same_names_is_refused(model, tmp_path):
    for root in ("monday", "tuesday"):
        write_grey(tmp_path / root / "IMG0001.png", 50 if root == "monday" else 200)
    out = tmp_path / "p.csv"
    assert run(tmp_path / "monday", "-m", model, "--out", out).exit_code == 0
    result = run(tmp_path / "tuesday", "-m", model, "--out", out)
    assert result.exit_code == 1 and "monday" in result.output and "tuesday" in result.output
    assert "Traceback" not in result.output and len(read_csv(out)) == 1


def test_changed_files_are_rescored_via_the_cli(model, tmp_path):
    src = tmp_path / "in"
    for i in range(4):
        write_grey(src / f"{i}.png", 40 * i)
    out = tmp_path / "p.csv"
    run(src, "-m", model, "--out", out)
    write_grey(src / "1.png", 250)
    result = run(src, "-m", model, "--out", out)
    assert result.exit_code == 0
    assert "1 scored" in result.stderr and "1 rescored (content changed" in result.stderr
    rows = read_csv(out)
    assert sorted(r["path"] for r in rows) == ["0.png", "1.png", "2.png", "3.png"]
    [one] = [r for r in rows if r["path"] == "1.png"]
    assert one["sha256"] == hashlib.sha256((src / "1.png").read_bytes()).hexdigest()


def test_retry_errors_via_the_cli(model, tmp_path, monkeypatch):
    """An error that was not the file's content (here: a decoder failure) is retried only
    with --retry-errors, and its path still appears once."""
    from fxscore import scoring

    src = tmp_path / "in"
    write_grey(src / "a.png", 10)
    write_grey(src / "b.png", 20)
    out = tmp_path / "p.csv"
    real = scoring.read_image

    def flaky(source, **kw):
        if kw.get("name", "").endswith("b.png"):
            raise MemoryError("pretend")
        return real(source, **kw)

    monkeypatch.setattr(scoring, "read_image", flaky)
    assert run(src, "-m", model, "--out", out).exit_code == EXIT_SOME_FAILED
    monkeypatch.setattr(scoring, "read_image", real)
    assert run(src, "-m", model, "--out", out).exit_code == EXIT_SOME_FAILED  # kept
    result = run(src, "-m", model, "--out", out, "--retry-errors")
    assert result.exit_code == 0 and "1 error rows retried" in result.stderr
    rows = read_csv(out)
    assert sorted(r["path"] for r in rows) == ["a.png", "b.png"]
    assert not any(r["error"] for r in rows)


@pytest.mark.parametrize("layout", ["empty", "no images"])
def test_nothing_to_score_exits_5(model, tmp_path, layout):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    if layout == "no images":
        for name in ("a.py", "b.py", "notes.txt"):
            (src / name).write_text("x")
    listed = tmp_path / "ignored.csv"
    result = run(src, "-m", model, "--out", tmp_path / "p.csv", "--list-ignored", listed)
    assert result.exit_code == 5, result.output
    assert "nothing to score" in result.stderr
    if layout == "no images":
        assert "3 ignored (.py 2, .txt 1)" in result.stderr
        assert read_csv(listed) == [{"path": "a.py", "reason": ".py"},
                                    {"path": "b.py", "reason": ".py"},
                                    {"path": "notes.txt", "reason": ".txt"}]
    else:
        assert read_csv(listed) == []


def test_ignored_files_are_broken_down_and_listed(model, tmp_path):
    src = tmp_path / "in"
    write_grey(src / "a.png", 10)
    for i in range(12):
        (src / "code" / f"m{i}.py").parent.mkdir(parents=True, exist_ok=True)
        (src / "code" / f"m{i}.py").write_text("x")
    for i in range(5):
        (src / f"n{i}.txt").write_text("x")
    (src / "=HYPERLINK(1).txt").write_text("x")  # listed neutralised, like every fxscore CSV
    listed = tmp_path / "lists" / "ignored.csv"
    result = run(src, "-m", model, "--out", tmp_path / "p.csv", "--list-ignored", listed)
    assert result.exit_code == 0
    assert "1 scored, 0 failed, 18 ignored (.py 12, .txt 6)" in result.stderr
    text = listed.read_text()
    assert text.startswith("path,reason\n") and "'=HYPERLINK(1).txt,.txt" in text
    assert len(text.splitlines()) == 19


def test_links_outside_input_are_reported(model, tmp_path):
    src = tmp_path / "in"
    write_grey(src / "a.png", 10)
    write_grey(tmp_path / "other" / "b.png", 10)
    (src / "up").symlink_to("../..")  # would walk the whole parent tree
    (src / "ext").symlink_to(tmp_path / "other")
    (src / "c.png").symlink_to(tmp_path / "other" / "b.png")
    result = run(src, "-m", model)
    assert result.exit_code == 0
    assert [r["path"] for r in read_csv(result.stdout)] == ["a.png"]
    assert ("3 links outside INPUT not followed (2 to folders, 1 to a file; use --follow-links)"
            in result.stderr)
    result = run(src, "-m", model, "--follow-links", "--list-ignored", tmp_path / "l.csv")
    assert "ext/b.png" in [r["path"] for r in read_csv(result.stdout)]
    assert "not followed" not in result.stderr


def test_summary_json(model, tmp_path):
    out, summary = tmp_path / "p.csv", tmp_path / "s" / "summary.json"
    result = run(SAMPLE_DATA, "-m", model, "--out", out, "--summary-json", summary)
    assert result.exit_code == EXIT_SOME_FAILED
    s = json.loads(summary.read_text())
    assert (s["scored"], s["failed"], s["candidates"], s["ignored"]) == (213, 3, 216, {".md": 1})
    assert s["exit_code"] == 3 and "3 file(s) could not be read" in s["reason"]
    assert s["model_id"] == read_csv(out)[0]["model_id"] and s["threshold"] == 0.5
    assert s["timings"]["files_per_s"] > 0 and s["timings"]["started_at"]
    # a fatal error writes it too
    result = run(SAMPLE_DATA, "-m", tmp_path / "missing.onnx", "--out", out,
                 "--summary-json", summary)
    s = json.loads(summary.read_text())
    assert result.exit_code == 1 and s["exit_code"] == 1 and "does not exist" in s["reason"]


def test_plain_progress_lines_in_a_log(model, tmp_path):
    """stderr not a terminal (a Slurm log): plain lines with done/total, no carriage returns."""
    src = tmp_path / "in"
    for i in range(40):
        write_grey(src / f"{i:02d}.png", i)
    result = run(src, "-m", model, "--out", tmp_path / "p.csv", "--batch-size", 4,
                 env={"FXSCORE_PROGRESS_INTERVAL": "0"})
    assert result.exit_code == 0 and "\r" not in result.stderr
    assert "scoring: 4/40 files (10%)" in result.stderr
    assert "scoring: 40/40 files (100%)" in result.stderr and "listing: 40" in result.stderr
    quiet = run(src, "-m", model, "--out", tmp_path / "q.csv", "-q",
                env={"FXSCORE_PROGRESS_INTERVAL": "0"})
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_help_shows_the_new_options_with_examples():
    result = CliRunner().invoke(cli, ["run", "--help"])
    for text in ("--threshold", "--max-memory", "--follow-links", "--retry-errors",
                 "--list-ignored", "--summary-json", "5 nothing", "130 interrupted",
                 "143", "--threshold 0.3"):
        assert text in result.output, text


# ---- real processes: signals, full disks, devices as --out, FIFOs, memory ---------------------

def _grey_tree(root: Path, n: int, size: int = 64) -> Path:
    rng = np.random.default_rng(n)
    for i in range(n):
        write_grey(root / f"d{i % 4}" / f"img{i:04d}.png", int(rng.integers(0, 256)), size=size)
    return root


def _wait_for_rows(out: Path, proc: subprocess.Popen, rows: int, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") > rows:
            return
        time.sleep(0.01)
    raise AssertionError(f"no {rows} rows in {out} (exit {proc.poll()})")


def _wait_for_library(proc: subprocess.Popen, name: str, timeout: float = 60) -> None:
    """Until a process below `proc` (or proc itself) has a shared library called `name` mapped."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        for pid in [proc.pid, *proctree.descendants(proc.pid)]:
            try:
                if name in Path(f"/proc/{pid}/maps").read_text():
                    return
            except OSError:
                pass
        time.sleep(0.02)
    raise AssertionError(f"{name} never loaded (exit {proc.poll()})")


def _complaints(stderr: str) -> list[str]:
    return [w for w in ("Traceback", "Aborted", "Exception ignored", "KeyboardInterrupt")
            if w in stderr]


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_signals_end_with_one_line_and_stay_resumable(model, tmp_path, sig, code, word):
    """Ctrl-C pressed three times (or SIGTERM) while a real run is busy: exit 130 (143), ONE
    line saying how to resume, no traceback and no "Aborted!"; the rerun completes the file."""
    src = _grey_tree(tmp_path / "in", 300)
    out, summary = tmp_path / "preds.csv", tmp_path / "summary.json"
    cmd = _cmd(src, model, out) + ["--quiet", "--summary-json", str(summary)]
    proc = subprocess.Popen(["timeout", "120", *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    child = proc  # `timeout` forwards the signal to fxscore
    _wait_for_rows(out, proc, 20)
    for _ in range(3 if sig == signal.SIGINT else 1):
        child.send_signal(sig)
        time.sleep(0.05)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines() == [
        f"{word}; the rows written so far are kept: rerun the same command to resume {out}"]
    assert not _complaints(stderr)
    s = json.loads(summary.read_text())
    assert s["exit_code"] == code and s["scored"] > 0 and word in s["reason"]
    done = len(read_csv(out))
    assert 0 < done < 300
    final = subprocess.run(["timeout", "120", *cmd], capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    rows = read_csv(out)
    assert sorted(r["path"] for r in rows) == sorted(all_files(src))  # each exactly once
    assert json.loads(summary.read_text())["already_done"] == done


def test_every_command_gets_the_interrupt_handling(model, tmp_path):
    """Installed at the group level: a command that sets no hint still exits 130 quietly."""
    src = tmp_path / "in"
    for cls in ("fractured", "not fractured"):
        _grey_tree(src / cls, 750, size=128)
    cmd = [sys.executable, "-m", "fxscore.cli", "eval", str(src), "-m", str(model),
           "--threads", "1", "--quiet"]
    proc = subprocess.Popen(["timeout", "120", *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    # onnxruntime is imported inside the command, so once it is mapped the handler is set:
    # a fixed sleep raced the interpreter's start on a loaded machine (killed by the signal)
    _wait_for_library(proc, "onnxruntime_pybind11_state")
    time.sleep(0.5)  # loading the model, scoring
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    _, stderr = proc.communicate(timeout=60)
    if proc.returncode in (0, 3):
        pytest.skip(f"eval ended (exit {proc.returncode}) before the signal arrived")
    assert proc.returncode == 130, stderr
    assert len(stderr.strip().splitlines()) == 1 and "interrupted (Ctrl-C)" in stderr
    assert not _complaints(stderr)


@pytest.fixture
def small_disk(tmp_path):
    """A 32 KiB tmpfs."""
    with small_tmpfs(tmp_path / "disk", "32k") as mnt:
        yield mnt


def test_a_full_disk_ends_with_one_line_and_stays_resumable(model, tmp_path, small_disk):
    src = _grey_tree(tmp_path / "in", 900, size=32)
    out = small_disk / "preds.csv"
    cmd = ["timeout", "120", *_cmd(src, model, out), "--quiet", "--batch-size", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and not _complaints(proc.stderr), proc.stderr
    assert "No space left on device" in lines[0] and "rerun the same command" in lines[0]
    text = out.read_text()
    complete = read_csv(text[:text.rindex("\n") + 1])  # a last record may be half-written
    assert 0 < len(complete) < 900 and all(len(r["sha256"]) == 64 for r in complete)
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    final = subprocess.run(cmd, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    rows = read_csv(out)
    assert sorted(r["path"] for r in rows) == sorted(all_files(src))


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full", "/dev/zero"])
def test_out_must_be_a_regular_file(model, device):
    """Refused before anything is read from or written to it, within a 4 GB address space."""
    import shutil

    if not shutil.which("prlimit"):
        pytest.skip("prlimit (util-linux) is not installed")
    cmd = ["timeout", "60", "prlimit", "--as=4000000000", "--",
           *_cmd(SAMPLE_DATA / "test", model, Path(device))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "not a regular file" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("Error: ")


def test_a_file_swapped_for_a_fifo_mid_run_is_an_error_row(model, tmp_path):
    src = tmp_path / "in"
    for i in range(300):
        write_grey(src / f"img{i:04d}.png", i % 256, size=64)
    out = tmp_path / "preds.csv"
    cmd = ["timeout", "120", *_cmd(src, model, out), "--batch-size", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_rows(out, proc, 5)
    victim = src / "img0290.png"  # listed long ago, not yet opened
    victim.unlink()
    os.mkfifo(victim)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SOME_FAILED, stderr  # not 124: it did not hang
    rows = {r["path"]: r for r in read_csv(out)}
    assert len(rows) == 300
    assert "not a regular file" in rows["img0290.png"]["error"]
    assert rows["img0290.png"]["sha256"] == ""
    assert sum(bool(r["error"]) for r in rows.values()) == 1


# A small launcher between pytest and the run: Linux carries a process's peak RSS across
# fork+exec, so a direct child of this big pytest process would report at least pytest's peak.
_PEAK_RSS = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
             "sys.exit(rc)")


def _peak_rss_mib(cmd: list[str]) -> float:
    proc = subprocess.run(["timeout", "120", sys.executable, "-c", _PEAK_RSS, *cmd],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stderr.strip().splitlines()[-1]) / 1024


def test_memory_stays_within_the_budget_whatever_the_workers(model, tmp_path):
    """Large images (6000 x 6000 RGB PNG: ~140 MiB of pixels each at the peak of a reduced
    decode) under --max-memory 200M: at most one is decoded at a time with 1 or 4 workers, so
    peak RSS is the model's process plus about one image, and does not grow with workers
    (without the budget, 4 workers hold 4 images at once)."""
    big = tmp_path / "big"
    big.mkdir()
    x = np.arange(6000, dtype=np.uint8)
    rgb = np.empty((6000, 6000, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = x[None, :], x[:, None], x[None, :] ^ x[:, None]
    Image.fromarray(rgb).save(big / "0.png", compress_level=1)
    del rgb
    for i in range(1, 4):
        os.link(big / "0.png", big / f"{i}.png")  # four files, decoded four times
    small = tmp_path / "small"
    write_grey(small / "a.png", 100)

    def cmd(src: Path, workers: int) -> list[str]:
        return [sys.executable, "-m", "fxscore.cli", "run", str(src), "-m", str(model), "-q",
                "--out", str(tmp_path / f"{src.name}{workers}.csv"), "--threads", "1",
                "--workers", str(workers), "--max-memory", "200M", "--batch-size", "4"]

    base = _peak_rss_mib(cmd(small, 1))  # interpreter, onnxruntime and the model
    one = _peak_rss_mib(cmd(big, 1))
    four = _peak_rss_mib(cmd(big, 4))
    print(f"peak RSS: base {base:.0f} MiB, 1 worker {one:.0f} MiB, 4 workers {four:.0f} MiB")
    assert len(read_csv(tmp_path / "big4.csv")) == 4
    assert all(not r["error"] for r in read_csv(tmp_path / "big4.csv"))
    assert four - base <= 200 + 60  # the budget, plus slack for allocator and threads
    assert four <= one + 60  # no growth with workers


# ---- DICOM options -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    import pacs_export

    return pacs_export.make_export(tmp_path_factory.mktemp("pacs") / "export")


def test_excluded_files_are_summarised_and_all_excluded_exits_5(model, export, tmp_path):
    import shutil

    src = tmp_path / "in"
    shutil.copytree(export / "PAT2" / "STUDY_C", src / "C")
    shutil.copy(export / "PAT1" / "STUDY_A" / "SR" / "SR1", src / "SR1")
    listed = tmp_path / "ignored.csv"
    result = run(src, "-m", model, "--out", tmp_path / "p.csv", "--list-ignored", listed,
                 "--summary-json", tmp_path / "s.json")
    assert result.exit_code == 5, result.output
    assert "excluded: 3 CT, 1 structured report" in result.stderr
    assert "nothing to score: every file under" in result.stderr
    assert read_csv(tmp_path / "p.csv") == []
    assert {r["reason"] for r in read_csv(listed)} == {"excluded: CT",
                                                       "excluded: structured report"}
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["excluded"] == {"CT": 3, "structured report": 1} and summary["exit_code"] == 5
    result = run(src, "-m", model, "--out", tmp_path / "ct.csv", "--modality", "CT")
    assert result.exit_code == 0, result.output
    assert len(read_csv(tmp_path / "ct.csv")) == 3 and "excluded: 1 structured report" in result.stderr


def test_for_processing_is_scored_on_request_with_a_warning(model, export, tmp_path):
    result = run(export, "-m", model, "--out", tmp_path / "p.csv", "--for-processing", "-q")
    assert result.exit_code == 0, result.output
    assert "PAT1/STUDY_A/DX/RAW1" in {r["path"] for r in read_csv(tmp_path / "p.csv")}
    assert "warning: scoring For Processing images" in result.stderr


def test_dicom_columns_warn_about_phi_and_resume_needs_the_same(model, export, tmp_path):
    out = tmp_path / "p.csv"
    result = run(export, "-m", model, "--out", out, "--dicom-columns", "default,PatientID")
    assert result.exit_code == 0, result.output
    assert "warning: --dicom-columns PatientID identify a person" in result.stderr
    rows = read_csv(out)
    assert list(rows[0])[7:] == ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                 "Modality", "BodyPartExamined", "ViewPosition", "PatientID"]
    assert {r["PatientID"] for r in rows} == {"P1", "P2", ""}
    result = run(export, "-m", model, "--out", out, "--dicom-columns")  # the default set only
    assert result.exit_code == 1 and "other columns" in result.stderr
    result = run(export, "-m", model, "--out", tmp_path / "q.csv", "--dicom-columns", "-q")
    assert result.exit_code == 0 and result.stderr == ""  # no PHI named, no warning
    assert "PatientID" not in read_csv(tmp_path / "q.csv")[0]


@pytest.mark.parametrize("args, message", [
    (["--dicom-columns", "PatientsName"], "'PatientsName' is not a DICOM keyword"),
    (["--dicom-columns", "PixelData"], "PixelData holds a sequence or binary data"),
    (["--modality", "C-T"], "not a DICOM modality code: C-T"),
    (["--decode-timeout", "0"], "--decode-timeout"),
])
def test_bad_dicom_options_are_usage_errors(model, tmp_path, args, message):
    result = run(tmp_path, "-m", model, "--out", tmp_path / "p.csv", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_a_bare_dicom_columns_before_input_is_explained(model, tmp_path):
    result = CliRunner().invoke(cli, ["run", "-m", str(model), "--dicom-columns",
                                      str(tmp_path / "export"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "put INPUT first" in result.stderr, result.output


def test_the_summary_line_says_whether_the_model_was_verified(model, tmp_path):
    src = tmp_path / "in"
    write_grey(src / "a.png", 100)
    result = run(src, "-m", model, "--out", tmp_path / "p.csv")
    assert f"model {result.stderr.split('model ')[1][:12]} (verified)," in result.stderr
    old = make_model(tmp_path / "v1.onnx", make_meta(format_version=1))
    result = run(src, "-m", old, "--out", tmp_path / "q.csv")
    assert result.exit_code == 0, result.output
    assert "(unverified: format version 1 carries no digest)," in result.stderr


def test_help_documents_the_dicom_options():
    from fxscore import cli as cli_module, isolate

    result = CliRunner().invoke(cli, ["run", "--help"])
    for text in ("--modality", "--for-processing", "--dicom-columns", "--sr-out",
                 "--decode-timeout", "--dicom-columns --sr-out sr/", "fxscore studies",
                 "every one excluded"):
        assert text in result.output, text
    assert cli_module.DECODE_TIMEOUT == isolate.DEFAULT_TIMEOUT


def test_the_readme_names_only_real_run_options():
    """Every --option the README's Scoring and Hospital sections name is one `fxscore run`
    (or, where the text says so, `fxscore studies`, `eval`, `audit`) really has."""
    import re

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    sections = [re.search(rf"^## {title}.*?(?=^## )", text, re.M | re.S).group(0)
                for title in (re.escape("Scoring: `fxscore run`"), "Hospital use")]
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", "".join(sections)))
    helps = "".join(CliRunner().invoke(cli, [command, "--help"]).output
                    for command in ("run", "studies", "eval", "audit"))
    offered = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", helps))
    assert named - offered == set()
    for option in ("--modality", "--for-processing", "--dicom-columns", "--sr-out",
                   "--decode-timeout"):
        assert option in named, option
