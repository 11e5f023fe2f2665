"""fxscore.export.calibrate: temperature scaling and the operating point, on synthetic logits and
on small exports; and the export of a real (tiny) `fxscore train` run with both, whose
metadata names no folder of the machine that built it.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from click.testing import CliRunner  # noqa: E402
from conftest import SAMPLE_DATA  # noqa: E402
from export_checkpoints import link_slice  # noqa: E402

from fxscore import membership  # noqa: E402
from fxscore.cli import cli  # noqa: E402
from fxscore.evaluate import evaluate  # noqa: E402
from fxscore.export import calibrate  # noqa: E402
from fxscore.export.onnx_export import ExportError, ProbabilityModel  # noqa: E402
from fxscore.hashing import sha256_file  # noqa: E402
from fxscore.model import load_model  # noqa: E402
from fxscore.modelfile import read_props  # noqa: E402
from fxscore.train.model import build_model  # noqa: E402


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


# ---------------------------------------------------------------------------- synthetic

@pytest.mark.parametrize("text, expected", [
    ("sensitivity:0.90", ("sensitivity", 0.9)), ("Specificity:1", ("specificity", 1.0)),
    (" sensitivity: 0.5", ("sensitivity", 0.5))])
def test_operating_points_parse(text, expected):
    assert calibrate.parse_operating_point(text) == expected


@pytest.mark.parametrize("text", ["sensitivity", "sensitivity:0", "sensitivity:1.5",
                                  "recall:0.9", "sensitivity:high", ""])
def test_bad_operating_points_name_the_form(text):
    with pytest.raises(ExportError, match="expected sensitivity:S or specificity:S"):
        calibrate.parse_operating_point(text)


@pytest.mark.parametrize("true_t", [0.4, 1.0, 3.0])
def test_temperature_fit_recovers_the_temperature_that_made_the_labels(true_t):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, 20000)
    y = (rng.random(z.size) < calibrate.sigmoid(z / true_t)).astype(int)
    t = calibrate.fit_temperature(z, y)
    assert t == pytest.approx(true_t, rel=0.08)
    # the fit is the minimum of the NLL: nudging it either way is worse
    assert calibrate.nll(z, y, t) <= min(calibrate.nll(z, y, t * 1.05), calibrate.nll(z, y, t / 1.05))


def test_temperature_fit_on_separable_data_stops_at_the_range():
    z = np.array([-3.0, -2.0, 2.0, 3.0])
    assert calibrate.fit_temperature(z, np.array([0, 0, 1, 1])) == calibrate.TEMPERATURE_RANGE[0]
    with pytest.raises(ExportError, match="both classes"):
        calibrate.fit_temperature(z, np.ones(4, int))


def test_an_overconfident_model_gets_a_lower_ece():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1, 4000)
    y = (rng.random(z.size) < calibrate.sigmoid(z)).astype(int)
    over = 6 * z  # six times too confident
    t = calibrate.fit_temperature(over, y)
    before = calibrate.calibration_metrics(y, calibrate.sigmoid(over))["ece"]
    after = calibrate.calibration_metrics(y, calibrate.sigmoid(over / t))["ece"]
    assert t == pytest.approx(6, rel=0.1) and after < 0.03 < 0.15 < before


def test_folding_the_temperature_divides_the_logit_exactly():
    torch.manual_seed(0)
    model = ProbabilityModel(build_model("none")).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        before = model.logit(x)
        calibrate.fold_temperature(model, 2.5)
        after = model.logit(x)
    torch.testing.assert_close(after, before / 2.5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind, target", [("sensitivity", 0.9), ("sensitivity", 0.75),
                                          ("specificity", 0.9), ("specificity", 1.0)])
def test_the_threshold_reaches_the_target_from_the_middle_of_a_gap(kind, target):
    rng = np.random.default_rng(2)
    y = np.r_[np.ones(40, int), np.zeros(60, int)]
    p = np.clip(np.r_[rng.normal(0.7, 0.15, 40), rng.normal(0.35, 0.15, 60)], 0.001, 0.999)
    t = calibrate.choose_threshold(y, p, kind, target)
    got = (p[y == 1] >= t).mean() if kind == "sensitivity" else (p[y == 0] < t).mean()
    assert got >= target
    # the nearest score is at least a quarter of its gap away: a CPU's rounding cannot cross it
    gap_lo = p[p < t].max() if (p < t).any() else 0.0
    gap_hi = p[p >= t].min()
    assert min(t - gap_lo, gap_hi - t) >= (gap_hi - gap_lo) / 4 - 1e-12
    assert len(repr(t)) <= 12  # a short decimal, not 0.6123456789012


def test_the_threshold_needs_both_classes_where_the_target_does():
    with pytest.raises(ExportError, match="no positive examples"):
        calibrate.choose_threshold(np.zeros(5, int), np.linspace(0, 1, 5), "sensitivity", 0.9)


# ---------------------------------------------------------------------------- a real run

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny `fxscore train` run in a temporary folder: 6 images per class and split."""
    root = tmp_path_factory.mktemp("run")
    data = root / "data"
    for split in ("train", "val"):
        link_slice(SAMPLE_DATA, data / split, per_class=6, split=split)
    r = invoke("train", data, "--out", root / "run", "--pretrained", "none", "--freeze", "none",
               "--epochs", "1", "--image-size", "64", "--batch-size", "4", "--quiet")
    assert r.exit_code == 0, r.output
    return root


@pytest.fixture(scope="module")
def exported(run):
    """The run exported with temperature scaling and an operating point."""
    out = run / "model.onnx"
    r = invoke("export", run / "run", "--out", out, "--calibrate", "temperature",
               "--threshold-for", "sensitivity:0.8", "--quiet")
    assert r.exit_code == 0, r.output
    return out, r


def test_the_metadata_holds_no_folder_of_the_machine_that_built_it(run, exported):
    out, _ = exported
    props = read_props(out.read_bytes())
    meta = props["fxscore"]
    # tmp_path is where the data and the run folder were: no trace of it, in any spelling
    for place in {str(run), str(run.resolve()), run.as_posix()}:
        assert place not in meta
    assert all(str(run) not in v for v in props.values())
    config = json.loads(meta)["training"]["config"]
    assert config["data"] == "." and config["out"] == "run"


def test_export_embeds_the_hashes_of_every_train_and_val_file(run, exported):
    out, r = exported
    model = load_model(out)
    table = membership.training_data(model)
    files = {split: sorted((run / "data" / split).rglob("*.*")) for split in ("train", "val")}
    assert len(table) == len({sha256_file(f) for fs in files.values() for f in fs})
    assert {table.split_of(sha256_file(f)) for f in files["train"]} <= {"train", "train+val"}
    assert {table.split_of(sha256_file(f)) for f in files["val"]} <= {"val", "train+val"}
    assert table.near_usable
    assert "training-data table: sha256 of" in r.stdout


def test_export_report_gives_the_temperature_and_ece_before_and_after(run, exported):
    out, r = exported
    report = json.loads(out.with_suffix(".export.json").read_text())
    c = report["calibration"]
    assert c["images"] == 12 and c["fit_on"] == "val" and c["temperature"] > 0
    assert c["nll_after"] <= c["nll_before"] + 1e-12  # the fit minimises it
    assert {"ece_before", "ece_after"} <= set(c)
    meta = load_model(out).meta
    assert meta.training["calibration"]["temperature"] == c["temperature"]
    assert f"T {c['temperature']:.3f}, ECE" in r.stdout


def test_the_embedded_threshold_reaches_the_operating_point_on_val(run, exported):
    out, _ = exported
    model = load_model(out)
    point = model.meta.training["operating_point"]
    assert point["operating_point"] == "sensitivity:0.8" and point["chosen_on"] == "val"
    assert model.meta.threshold == point["threshold"] != 0.5
    # `fxscore eval` on the validation images reproduces it with the shipped file
    ev = evaluate(run / "data" / "val", model, n_bootstrap=0)
    assert ev.metrics["operating_points"]["model"]["sensitivity"] >= 0.8
    assert ev.metrics["operating_points"]["model"]["sensitivity"] == point["sensitivity"]


def test_the_probabilities_are_the_temperature_scaled_ones(run, exported, tmp_path):
    out, _ = exported
    plain = tmp_path / "plain.onnx"
    r = invoke("export", run / "run", "--out", plain, "--no-training-hashes", "--quiet")
    assert r.exit_code == 0, r.output
    t = load_model(out).meta.training["calibration"]["temperature"]
    items = sorted((run / "data" / "val").rglob("*.*"))
    ev_t = evaluate(run / "data" / "val", load_model(out), n_bootstrap=0)
    ev_1 = evaluate(run / "data" / "val", load_model(plain), n_bootstrap=0)
    p_t = np.array([r["probability"] for r in ev_t.rows])
    p_1 = np.array([r["probability"] for r in ev_1.rows])
    logit = np.log(p_1 / (1 - p_1))
    np.testing.assert_allclose(p_t, calibrate.sigmoid(logit / t), atol=2e-5)
    assert len(items) == 12
    # and --no-training-hashes left the table out
    assert membership.ENTRY not in read_props(plain.read_bytes())
    assert load_model(plain).meta.training_data == {}


@pytest.mark.parametrize("args, message", [
    (["--threshold", "0.3", "--threshold-for", "sensitivity:0.9"], "give one"),
    (["--threshold-for", "sensitivity"], "expected sensitivity:S"),
    (["--val", "/no/such/folder", "--calibrate", "temperature"], "--val /no/such/folder"),
    (["--training-data", SAMPLE_DATA], "holds other files than the run was trained on"),
])
def test_unusable_calibration_options_write_nothing(run, tmp_path, args, message):
    r = invoke("export", run / "run", "--out", tmp_path / "m.onnx", "--quiet", *args)
    assert r.exit_code == 1 and message in r.output, r.output
    assert not list(tmp_path.iterdir())


def test_a_moved_data_folder_is_found_with_training_data(run, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(run / "data", moved)
    ckpt = torch.load(run / "run" / "best.pt", weights_only=True)
    ckpt["config"]["data"] = str(tmp_path / "gone")
    torch.save(ckpt, tmp_path / "best.pt")
    r = invoke("export", tmp_path / "best.pt", "--out", tmp_path / "a.onnx", "--quiet")
    assert r.exit_code == 1 and "--training-data DIR" in r.output and "--no-training-hashes" \
        in r.output, r.output
    r = invoke("export", tmp_path / "best.pt", "--out", tmp_path / "b.onnx", "--quiet",
               "--training-data", moved)
    assert r.exit_code == 0, r.output
    assert membership.training_data(load_model(tmp_path / "b.onnx")) is not None
    assert not math.isnan(load_model(tmp_path / "b.onnx").meta.threshold)
