"""`fxscore info` through click's CliRunner, and the eval report's Model section."""
from __future__ import annotations

import json
import re

from click.testing import CliRunner

from eval_data import make_folders
from fxscore.cli import cli
from onnx_models import make_meta, make_model
from test_info import TRAINING


def invoke(*args):
    return CliRunner().invoke(cli, ["info", *map(str, args)])


def test_info_prints_what_the_model_carries(tmp_path):
    path = make_model(tmp_path / "m.onnx", make_meta(training=TRAINING, threshold=0.37,
                                                     model_version="2.1"))
    r = invoke(path)
    assert r.exit_code == 0, r.output
    for text in ("name                       test-gap", "version                    2.1",
                 "classes                    fractured, not fractured",
                 "positive class             fractured (probability >= threshold), else not "
                 "fractured", "threshold                  0.3700",
                 "input                      64 x 64 px (height x width), stretched to that size, "
                 "bilinear resize",
                 "normalisation              (x - mean) / std on intensities x in [0, 1]; "
                 "mean 0.485, 0.456, 0.406; std 0.229, 0.224, 0.225",
                 "graph                      ONNX opset 17", "precision                  fp32",
                 "integrity                  verified: digest sha256:", "Training summary",
                 "  best epoch               12 (of at most 40)"):
        assert text in r.stdout, text
    assert " v2.1" not in r.stdout


def test_info_json_is_for_machines(tmp_path):
    path = make_model(tmp_path / "m.onnx", make_meta(training=TRAINING))
    r = invoke(path, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["precision"] == "fp32" and doc["threshold"] == 0.5
    assert doc["training"]["best_metrics"]["val_loss"] == TRAINING["best_metrics"]["val_loss"]
    assert doc["integrity"]["verified"] is True


def test_info_defaults_to_the_packaged_model(monkeypatch):
    monkeypatch.delenv("FXSCORE_MODEL", raising=False)
    r = invoke()
    assert r.exit_code == 0, r.output
    assert "fxscore-resnet18-default" in r.stdout and "precision                  fp32" \
        in r.stdout


def test_info_on_a_file_that_is_not_an_fxscore_model(tmp_path):
    plain = make_model(tmp_path / "plain.onnx", with_meta=False)
    r = invoke(plain)
    assert r.exit_code == 1
    assert "carries no fxscore metadata" in r.stderr and "Traceback" not in r.output
    assert invoke(tmp_path / "missing.onnx").exit_code == 1


def test_info_help_has_examples():
    r = invoke("--help")
    assert r.exit_code == 0
    assert "fxscore info model.onnx --json" in r.output and "Examples:" in r.output


def test_eval_report_model_section_uses_the_readable_form(tmp_path):
    model = make_model(tmp_path / "m.onnx", make_meta(training=TRAINING))
    data = make_folders(tmp_path / "data")
    r = CliRunner().invoke(cli, ["eval", str(data), "-m", str(model), "--report",
                                 str(tmp_path / "out"), "--bootstrap", "0", "-q"])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "out" / "report.html").read_text()
    section = page.split("<h2>Model</h2>")[1].split("</section>")[0]
    assert "loss 0.251, accuracy 0.904, ROC-AUC 0.960" in section
    assert "validation, best epoch" in section and "last epoch" not in section
    assert not re.search(r"\d\.\d{6,}", section)  # no 16-digit floats
    assert "best_metrics" not in section and "{" not in section


def test_version_flag_short_and_long():
    from fxscore import __version__

    for flag in ("-V", "--version"):
        r = CliRunner().invoke(cli, [flag])
        assert r.exit_code == 0 and r.output.strip() == f"fxscore, version {__version__}"


def test_shell_completion_as_the_readme_documents_it(tmp_path):
    """README: eval "$(_FXSCORE_COMPLETE=bash_source fxscore)"; and completing `fxscore in`."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert 'eval "$(_FXSCORE_COMPLETE=bash_source fxscore)"' in readme
    fxscore = str(Path(sys.executable).with_name("fxscore"))
    script = subprocess.run([fxscore], env={**os.environ, "_FXSCORE_COMPLETE": "bash_source"},
                            capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and "_fxscore_completion" in script.stdout
    done = subprocess.run([fxscore], env={**os.environ, "_FXSCORE_COMPLETE": "bash_complete",
                                          "COMP_WORDS": "fxscore in", "COMP_CWORD": "1"},
                          capture_output=True, text=True, timeout=60)
    assert "plain,info" in done.stdout


def test_group_and_export_help_show_the_new_commands_and_forms():
    top = CliRunner().invoke(cli, ["--help"])
    for text in ("fxscore info model.onnx", "fxscore wrap their.onnx --out fx.onnx",
                 "_FXSCORE_COMPLETE=bash_source fxscore", "info", "wrap"):
        assert text in top.output, text
    export = CliRunner().invoke(cli, ["export", "--help"])  # works without torch
    assert export.exit_code == 0
    for text in ("CHECKPOINT|RUN", "fxscore export runs/r18 --out model.onnx --verify data/val",
                 "--model-version 2.1", "stored and shown as given"):
        assert text in export.output, text
