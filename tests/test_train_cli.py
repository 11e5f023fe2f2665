"""`fxscore train` through click's CliRunner: help, refusals with exit codes, a tiny run, resume."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import urllib.error
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from fxscore.cli import EXIT_SOME_FAILED, cli, train  # noqa: E402
from fxscore.train.config import TrainConfig  # noqa: E402

pytestmark = pytest.mark.torch
SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
QUICK = ["--pretrained", "none", "--image-size", "32", "--epochs", "2", "--batch-size", "8",
         "--limit-per-class", "8", "--threads", "1", "--cache-views", "1"]


def invoke(*args: str):
    return CliRunner().invoke(cli, ["train", *map(str, args)])


def test_help_lists_the_recipe():
    result = invoke("--help")
    assert result.exit_code == 0
    for option in ("--pretrained", "--freeze", "--epochs", "--batch-size", "--lr",
                   "--weight-decay", "--patience", "--pos-weight", "--seed", "--device",
                   "--workers", "--image-size", "--positive-class", "--cache-views", "--resume",
                   "--max-minutes", "--limit-per-class", "--scheduler", "Examples:"):
        assert option in result.output


def test_cli_defaults_are_the_config_defaults():
    options = {p.name: p.default for p in train.params}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING and f.name != "resize":  # resize: not an option
            assert options[f.name] == f.default, f.name


def test_tiny_run(tmp_path):
    result = invoke(SAMPLE, "--out", tmp_path / "run", *QUICK)
    assert result.exit_code == 0, result.output
    assert "epoch 1/2" in result.stderr and "epoch 2/2" in result.stderr
    assert "best epoch" in result.stderr and "fxscore export" in result.stderr
    # progress in a log (stderr is not a terminal here): one plain line per finished stage
    assert "train decode train: 16/16 files (100%)" in result.stderr
    assert re.search(r"^train epoch 2/2: \d+/\d+ images \(100%\)", result.stderr, re.M)
    assert "\r" not in result.stderr
    assert result.stdout == ""  # everything human goes to stderr
    doc = json.loads((tmp_path / "run" / "config.json").read_text())
    assert doc["config"]["image_size"] == 32 and doc["config"]["freeze"] == "backbone"
    for name in ("best.pt", "last.pt", "history.csv", "train.log"):
        assert (tmp_path / "run" / name).is_file()


def test_quiet_prints_nothing_but_problems(tmp_path):
    result = invoke(SAMPLE, "--out", tmp_path / "run", *QUICK, "--epochs", "1", "--quiet")
    assert result.exit_code == 0 and result.output == ""


def test_resume_continues_with_the_saved_recipe(tmp_path):
    assert invoke(SAMPLE, "--out", tmp_path / "run", *QUICK).exit_code == 0
    # Only --epochs given: every other option comes from the run's config.json.
    result = invoke(SAMPLE, "--out", tmp_path / "run", "--resume", "--epochs", "3")
    assert result.exit_code == 0, result.output
    assert "resumed after epoch 2" in result.stderr and "epoch 3/3" in result.stderr
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(history) == 4
    changed = invoke(SAMPLE, "--out", tmp_path / "run", "--resume", "--lr", "0.1")
    assert changed.exit_code == 1 and "cannot change --lr" in changed.output


def test_unreadable_files_exit_3(tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        shutil.copytree(SAMPLE / split, data / split)
    shutil.copy(SAMPLE / "extras/broken/truncated.png", data / "val/fractured/truncated.png")
    result = invoke(data, "--out", tmp_path / "run", *QUICK, "--limit-per-class", "100",
                    "--epochs", "1")
    assert result.exit_code == EXIT_SOME_FAILED, result.output
    assert "1 file could not be read and was skipped" in result.stderr
    assert "train.log" in result.stderr
    assert "truncated.png" in (tmp_path / "run/train.log").read_text()


@pytest.mark.parametrize("layout, words", [
    ("none", ["no such folder", "train/", "val/"]),
    ("no_val", ["missing val/", "one folder per class"]),
    ("one_class", ["found 1 class folders", "need exactly 2"]),
])
def test_bad_data_folders_exit_1(tmp_path, layout, words):
    data = tmp_path / "data"
    if layout != "none":
        shutil.copytree(SAMPLE / "train", data / "train")
        if layout == "one_class":
            shutil.rmtree(data / "train" / "not fractured")
            shutil.copytree(data / "train", data / "val")
    result = invoke(data, "--out", tmp_path / "run", *QUICK)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    for w in words:
        assert w in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, words", [
    (["--pos-weight", "heavy"], ["--pos-weight", "none, auto or a positive number"]),
    (["--freeze", "head"], ["--freeze", "backbone"]),
    (["--batch-size", "1"], ["--batch-size"]),
])
def test_usage_errors_exit_2(tmp_path, args, words):
    result = invoke(SAMPLE, "--out", tmp_path / "run", *args)
    assert result.exit_code == 2
    for w in words:
        assert w in result.output


def test_existing_run_and_offline_imagenet_exit_1(tmp_path, monkeypatch):
    assert invoke(SAMPLE, "--out", tmp_path / "run", *QUICK, "--epochs", "1").exit_code == 0
    again = invoke(SAMPLE, "--out", tmp_path / "run", *QUICK)
    assert again.exit_code == 1 and "--resume" in again.output

    import torch.hub

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    result = invoke(SAMPLE, "--out", tmp_path / "imagenet", "--pretrained", "imagenet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--pretrained PATH.pth" in result.output and "--pretrained none" in result.output


def test_without_torch_the_error_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails, as without [train]
    for name in [m for m in sys.modules if m.startswith("fxscore.train.")]:
        monkeypatch.delitem(sys.modules, name)
    assert invoke("--help").exit_code == 0
    result = invoke(SAMPLE, "--out", tmp_path / "run", *QUICK)
    assert result.exit_code == 1 and 'pip install ".[train]"' in result.output
    # the README's install command, word for word
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert 'pip install ".[train]"' in readme and "fxscore[train]" not in readme


def test_ctrl_c_prints_one_line_that_says_how_to_continue(tmp_path):
    """A real training process interrupted after its first epoch: exit 130 and ONE line,
    "interrupted (Ctrl-C); continue with: fxscore train ... --resume", nothing else."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    # --epochs 50 and no early stopping: still busy when the signal comes
    args = [a if a != "2" else "50" for a in QUICK] + ["--patience", "0"]
    cmd = [sys.executable, "-m", "fxscore.cli", "train", str(SAMPLE), "--out", str(out), *args]
    proc = subprocess.Popen(["timeout", "300", *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("epoch 1/50"):
                proc.send_signal(signal.SIGINT)  # `timeout` forwards it to fxscore
                break
        rest = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert lines and lines[-1].startswith("epoch 1/50"), "".join(lines)
    assert proc.returncode == 130, rest
    hint = f"interrupted (Ctrl-C); continue with: fxscore train {SAMPLE} --out {out} --resume"
    after = rest.strip().splitlines()  # an epoch may have been logged before the signal landed
    assert after[-1] == hint and [x for x in after if "interrupt" in x] == [hint], rest
    assert not any(w in rest for w in ("Traceback", "Aborted", "KeyboardInterrupt"))
