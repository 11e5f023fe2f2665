"""fxscore.rayoptions: every `run` option is decided for --ray, what cannot work is refused with
exit 2 before any work, and the options cost a run without --ray no imports of fxscore.rayrun."""
from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from fxscore.cli import cli

from conftest import SAMPLE_DATA


def run_cli(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


@pytest.mark.parametrize("args, message", [
    (["--ray", "local"], "--out -"),  # stdout: the default --out
    (["--ray", "local", "--out", "x.csv", "--provider", "cuda"], "--provider cuda"),
    (["--ray", "auto", "--out", "x.csv", "--ray-cpus", "2"], "--ray-cpus with a running"),
    (["--out", "x.csv", "--ray-cpus", "2"], "--ray-cpus needs --ray"),
    (["--out", "x.csv", "--ray-actors", "2"], "--ray-actors needs --ray"),
    (["--ray", "local", "--out", "x.csv", "--ray-actors", "3,1"], "1 <= MIN <= MAX"),
    (["--ray", "local", "--out", "x.csv", "--ray-actors", "two"], "N or MIN,MAX"),
    (["--ray", "local", "--out", "x.csv", "--ray-batch-size", "0"], "--ray-batch-size"),
])
def test_options_that_cannot_work_are_refused_with_exit_2(args, message, tmp_path,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(SAMPLE_DATA, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "x.csv").exists()  # refused before anything was written


def test_every_run_option_is_decided_for_ray():
    """A new `run` option must be added to WORKS_WITH_RAY or REFUSED_WITH_RAY."""
    from fxscore.rayoptions import REFUSED_WITH_RAY, WORKS_WITH_RAY

    names = {p.name for p in cli.commands["run"].params}
    assert not names - WORKS_WITH_RAY - set(REFUSED_WITH_RAY), "decide how these work with --ray"
    assert {"ray", "ray_cpus", "ray_actors", "ray_batch_size"} <= names


def test_an_undecided_option_is_refused(monkeypatch, tmp_path):
    from fxscore import rayoptions

    monkeypatch.setattr(rayoptions, "WORKS_WITH_RAY",
                        rayoptions.WORKS_WITH_RAY - {"follow_links"})
    monkeypatch.chdir(tmp_path)
    result = run_cli(SAMPLE_DATA, "--ray", "local", "--out", "x.csv", "--follow-links")
    assert result.exit_code == 2
    assert "--follow-links (it has not been made to work with --ray yet)" in result.output


def test_help_lists_the_ray_options_and_what_they_refuse():
    result = CliRunner().invoke(cli, ["run", "--help"], terminal_width=200)
    text = " ".join(result.output.split())
    for option in ("--ray auto|local|ADDRESS", "--ray-cpus N", "--ray-actors N|MIN,MAX",
                   "--ray-batch-size N"):
        assert option in text
    for refused in ("--out -", "--provider cuda", "--sr-out", "--heatmaps"):
        assert refused in text


def test_the_cli_imports_the_ray_machinery_only_for_a_ray_run(tmp_path):
    """`fxscore --help` and a run without --ray do not import fxscore.rayrun (logging, pickle,
    tempfile: some 20 ms of every start)."""
    from onnx_models import make_model

    model = make_model(tmp_path / "tiny.onnx")
    code = ("import sys; from fxscore.cli import cli; "
            f"cli.main(['run', {str(SAMPLE_DATA)!r}, '--model', {str(model)!r}, '--out', "
            f"{str(tmp_path / 'x.csv')!r}, '--quiet'], standalone_mode=False); "
            "assert 'fxscore.rayrun' not in sys.modules, 'fxscore.rayrun imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
