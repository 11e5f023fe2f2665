"""The packaged default model (fxscore/models/default.onnx) against its recipe and its card.

MODEL_CARD.md's headline numbers must be what the recipe's own evaluation gives: this module
re-makes the recipe's split from the real X-rays (audit, then split with the seed of
scripts/make_default_model.sh), evaluates the packaged model on its test split as the recipe
does, and reads the card's headline table against that metrics.json, not against a copy of the
numbers. It also checks that the model was trained with the options the recipe states, that
its metadata names no place of the machine that built it, and that its training-data table is
exactly the split's train and val images.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from click.testing import CliRunner

from fxscore import membership
from fxscore.cli import cli
from fxscore.model import load_model

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "make_default_model.sh"
CARD = REPO / "MODEL_CARD.md"


def script_text() -> str:
    """make_default_model.sh with line continuations joined and its ${VAR:-default}s filled in."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    defaults = dict(re.findall(r'^(\w+)="\$\{\1:-([^}]*)\}"', text, re.M))
    return re.sub(r'"?\$\{?(\w+)\}?"?', lambda m: defaults.get(m[1], m[0]), text)


def command_options(name: str) -> dict[str, str]:
    """The options of the script's `fxscore NAME ...` line -> {"--opt": value or ""}."""
    line = next(ln for ln in script_text().splitlines() if f"fxscore {name} " in ln)
    line = line[line.index(f"fxscore {name} "):]
    words = shlex.split(line.split("||")[0].split("|")[0])[2:]
    options, i = {}, 0
    while i < len(words):
        if words[i].startswith("--"):
            takes_value = i + 1 < len(words) and not words[i + 1].startswith("--")
            options[words[i]] = words[i + 1] if takes_value else ""
            i += 2 if takes_value else 1
        else:
            i += 1  # positional arguments
    return options


def split_seed_options() -> list[str]:
    opts = command_options("split")
    return ["--val", opts["--val"], "--test", opts["--test"], "--seed", opts["--seed"]]


@pytest.fixture(scope="module")
def recipe(real_data_root, tmp_path_factory):
    """The recipe's split and its evaluation of the packaged model: (clean folder, metrics)."""
    work = tmp_path_factory.mktemp("recipe")
    runner = CliRunner()
    audit = runner.invoke(cli, ["audit", str(real_data_root), "--out", str(work / "audit")])
    assert audit.exit_code in (0, 3), audit.output  # 3: the public set's truncated files
    split = runner.invoke(cli, ["split", str(real_data_root), "--out", str(work / "clean"),
                                *split_seed_options(), "--audit", str(work / "audit")])
    assert split.exit_code in (0, 3), split.output
    clean = work / "clean"
    groups = work / "test-groups.csv"
    with groups.open("wb") as f:  # the recipe's own groups file
        subprocess.run([sys.executable, str(REPO / "scripts" / "split_groups.py"), str(clean),
                        "test"], stdout=f, check=True)
    target = command_options("eval")["--target-sensitivity"]
    ev = runner.invoke(cli, ["eval", str(clean / "test"), "--groups", str(groups),
                             "--target-sensitivity", target, "--report", str(work / "eval")])
    assert ev.exit_code == 0, ev.output
    return clean, json.loads((work / "eval" / "metrics.json").read_text())


def headline() -> dict[str, tuple[str, str]]:
    """The card's headline table: {row label: (value, CI text)}."""
    section = CARD.read_text().split("## Headline", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and not set(cells[1]) <= set("-:") and cells[0] != "metric":
            rows[cells[0]] = (cells[1].strip("*"), cells[2])
    return rows


def ci(m: dict) -> str:
    return f"[{m['low']:.3f}, {m['high']:.3f}]"


@pytest.mark.realdata
def test_card_headline_is_the_recipes_evaluation(recipe):
    _, metrics = recipe
    at_model, at_target = metrics["operating_points"]["model"], metrics["operating_points"]["target"]
    threshold = metrics["threshold"]["model"]
    expected = {
        "ROC-AUC": (f"{metrics['roc_auc']['value']:.3f}", ci(metrics["roc_auc"]["ci"])),
        "average precision": (f"{metrics['average_precision']['value']:.3f}",
                              ci(metrics["average_precision"]["ci"])),
        "expected calibration error":
            (f"{metrics['calibration']['expected_calibration_error']:.3f}", ""),
        "Brier score": (f"{metrics['calibration']['brier']:.3f}", ""),
        f"sensitivity at the embedded threshold {threshold:g}":
            (f"{at_model['sensitivity']:.3f}", ci(at_model["ci"]["sensitivity"])),
        f"specificity at the embedded threshold {threshold:g}":
            (f"{at_model['specificity']:.3f}", ci(at_model["ci"]["specificity"])),
        "specificity at 95% sensitivity":
            (f"{at_target['specificity']:.3f}", ci(at_target["ci"]["specificity"])),
        "test images that are near copies of training images":
            (str(metrics["training_copies"]["near"] + metrics["training_copies"]["exact"]), ""),
    }
    assert headline() == expected
    # and the card says which test split it is
    data = metrics["data"]
    assert (f"{data['files']:,} images in {data['groups']} groups" in
            CARD.read_text().split("## Headline", 1)[1].split("\n", 1)[0])


def test_model_was_trained_with_the_recipes_options():
    from fxscore.train.config import TrainConfig  # torch-free

    names = {f.name for f in fields(TrainConfig)}
    meta = load_model().meta
    config = meta.training["config"]
    stated = command_options("train")
    assert len(stated) >= 10, stated
    for option, value in stated.items():
        key = option[2:].replace("-", "_")
        if key in ("out", "quiet", "resume"):
            continue
        assert key in names, option
        saved = config[key]
        parsed = type(saved)(value) if saved is not None else value
        assert parsed == saved, f"{option}: recipe {value!r}, model {saved!r}"
    exported = command_options("export")
    assert meta.model_name == exported["--model-name"]
    assert meta.model_version.split("-")[0] == exported["--model-version"]
    assert meta.training["calibration"]["method"] == exported["--calibrate"]
    kind, _, target = exported["--threshold-for"].partition(":")
    assert meta.training["operating_point"]["operating_point"] == f"{kind}:{float(target):g}"
    assert meta.threshold == meta.training["operating_point"]["threshold"]
    assert meta.cam and meta.ood, "the default model has heatmap outputs and OOD statistics"


def _strings(value):
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            yield value
            return
        if isinstance(parsed, str):
            yield parsed
        else:
            yield from _strings(parsed)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


ABSOLUTE = re.compile(r"(^|[\s'\"=])(/[A-Za-z0-9_.-]+/|[A-Za-z]:\\|~/)")


def test_metadata_names_no_place_of_the_build_machine():
    props = load_model().session.get_modelmeta().custom_metadata_map
    strings = [s for k, v in props.items() if k != membership.ENTRY for s in _strings(v)]
    assert len(strings) > 50  # the training summary is there to be checked
    places = [s for s in strings if ABSOLUTE.search(s)]
    assert not places, places


@pytest.mark.realdata
def test_training_table_is_the_splits_train_and_val(recipe):
    clean, _ = recipe
    expected: dict[bytes, int] = {}
    for split, bit in (("train", membership.TRAIN), ("val", membership.VAL)):
        for path in (clean / split).rglob("*"):
            if path.is_file():
                key = hashlib.sha256(path.read_bytes()).digest()
                expected[key] = expected.get(key, 0) | bit
    table = membership.training_data(load_model())
    assert table is not None, "the default model carries no training-data table"
    # numpy hands out S32 items without their trailing zero bytes
    got = {bytes(d).ljust(32, b"\0"): int(s) for d, s in zip(table.digests, table.splits)}
    assert all(table.split_of(d.hex()) for d in expected)
    assert got == expected
    assert table.near_usable  # near copies of training images are found by `eval`
