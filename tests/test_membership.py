"""fxscore.membership: the training-data table a model carries, and the copies it finds.

Torch-free: the models are onnx.helper graphs with a table written the way `fxscore export`
writes it (its own metadata entry, summarised in the digest-covered fxscore metadata).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SAMPLE_DATA
from onnx_models import make_meta, make_model
from PIL import Image, ImageEnhance

from fxscore import membership as mb
from fxscore.contract import ContractError, ModelMeta
from fxscore.files import find_images
from fxscore.hashing import sha256_file
from fxscore.model import load_model
from fxscore.modelfile import read_props, with_entry, write_model


def files_of(split: str) -> list[Path]:
    return [p for _, p in find_images(SAMPLE_DATA / split)]


def with_table(path: Path, train: list[Path], val: list[Path], *, descriptors: bool = True,
               text_override: str | None = None) -> Path:
    """A tiny model whose table holds these files, written as the export writes it."""
    described = None
    if descriptors:
        described = {sha256_file(f): mb.describe_file(f) for f in [*train, *val]}
    summary, text = mb.encode([sha256_file(f) for f in train], [sha256_file(f) for f in val],
                              described)
    make_model(path, with_meta=False)
    data = with_entry(path.read_bytes(), mb.ENTRY, text_override or text)
    write_model(data, dataclasses.replace(make_meta(), training_data=summary), path)
    return path


@pytest.fixture(scope="module")
def sample_model(tmp_path_factory) -> Path:
    """A model 'trained' on sample_data's train/ and val/."""
    return with_table(tmp_path_factory.mktemp("m") / "m.onnx", files_of("train"),
                      files_of("val"))


def fake_sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


# ---------------------------------------------------------------------------- the table

def test_table_round_trip_keeps_every_content_once_with_its_splits():
    train = [fake_sha(i) for i in (1, 2, 3, 3)]  # a repeat counts once
    summary, text = mb.encode(train, [fake_sha(3), fake_sha(4)])
    table = mb.decode(text, summary)
    assert (summary["contents"], summary["train"], summary["val"]) == (4, 3, 2)
    assert [table.split_of(fake_sha(i)) for i in (1, 3, 4, 5)] == ["train", "train+val", "val",
                                                                   ""]
    assert table.split_of("") == "" and table.split_of("not hex") == ""
    assert table.descriptors is None and not table.near_usable
    assert summary["bytes"] == len(text.encode()) and "descriptor_kind" not in summary


@pytest.mark.parametrize("tail", ["00", "0000", "01"])
def test_digests_ending_in_zero_bytes_are_found(tail):
    """numpy drops the trailing zero bytes of an S32 item it hands out; about 1 image in 256 of
    a real training set has such a digest (9 of the default model's 1,999)."""
    digests = [fake_sha(i)[:-len(tail)] + tail for i in range(50)]
    summary, text = mb.encode(digests[:30], digests[30:])
    table = mb.decode(text, summary)
    assert [table.split_of(d) for d in digests] == ["train"] * 30 + ["val"] * 20
    assert mb.exact_split(table, digests[:2] + [fake_sha(99)]) == ["train", "train", ""]


def test_table_size_per_image_is_as_documented():
    n = 300
    rng = np.random.default_rng(0)
    desc = {fake_sha(i): rng.normal(size=(8, 70)).astype(np.float32) for i in range(n)}
    hashes_only = mb.encode(list(desc), [])[0]["bytes"] / n
    with_desc = mb.encode(list(desc), [], desc)[0]["bytes"] / n
    # module doc: 33 bytes (44 as base64) per content, 103 (137) with a descriptor
    assert 44 <= hashes_only <= 45 and 137 <= with_desc <= 139, (hashes_only, with_desc)


def test_int8_descriptors_keep_similarities_within_0_01():
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(50, 2, 35)).astype(np.float32)
    raw /= np.linalg.norm(raw, axis=2, keepdims=True) * np.sqrt(2)
    desc = np.repeat(raw.reshape(50, 1, 70), 8, axis=1)
    stored = mb._dequantise(np.stack([mb._quantise(d) for d in desc]))
    exact = desc[:, 0] @ desc[:, 0].T
    assert np.abs(stored @ desc[:, 0].T - exact).max() < 0.01


@pytest.mark.parametrize("bad, message", [
    ([], "must be a JSON object"),
    ({"format": 9}, "format 9 is not one this fxscore reads"),
    ({"format": 1, "entry": "other"}, "entry must be"),
    ({"format": 1, "entry": mb.ENTRY, "sha256": "abc"}, "sha256 must be"),
    ({"format": 1, "entry": mb.ENTRY, "sha256": "0" * 64, "contents": -1}, "contents must be"),
    ({"format": 1, "entry": mb.ENTRY, "sha256": "0" * 64, "contents": 1, "train": True},
     "train must be"),
])
def test_the_contract_refuses_a_malformed_summary(bad, message):
    d = {**make_meta().to_dict(), "training_data": bad}
    with pytest.raises(ContractError, match=message):
        ModelMeta.from_dict(d)


def test_the_summary_round_trips_through_the_contract():
    summary, _ = mb.encode([fake_sha(1)], [])
    meta = dataclasses.replace(make_meta(), training_data=summary)
    assert ModelMeta.from_props(meta.to_props()).training_data == summary
    assert "training_data" not in make_meta().to_dict()  # absent when empty, as before


def test_with_entry_replaces_an_earlier_entry_and_keeps_the_digest(tmp_path, sample_model):
    data = sample_model.read_bytes()
    again = with_entry(with_entry(data, mb.ENTRY, "first"), mb.ENTRY, "second")
    assert read_props(again)[mb.ENTRY] == "second"
    assert list(read_props(again)).count(mb.ENTRY) == 1
    (tmp_path / "m.onnx").write_bytes(again)
    load_model(tmp_path / "m.onnx")  # the digest leaves other entries out: still verified
    with pytest.raises(ValueError, match="written by embed_bytes"):
        with_entry(data, "fxscore", "{}")


# ---------------------------------------------------------------------------- lookups

def test_exact_copies_are_found_by_content_under_any_name(sample_model):
    model = load_model(sample_model)
    train, val, test = files_of("train"), files_of("val"), files_of("test")
    shas = [sha256_file(p) for p in (train[0], val[0], test[0])] + [""]
    copies = mb.training_copies(model, shas)
    assert [c.text for c in copies] == ["exact:train", "exact:val", "", ""]
    assert copies[0].similarity == 1.0 and not copies[2]


def planted(original: Path, dest: Path, kind: str) -> Path:
    im = Image.open(original).convert("L")
    im = {"flip": lambda: im.transpose(Image.FLIP_LEFT_RIGHT),
          "rotate90": lambda: im.transpose(Image.ROTATE_90),
          "half_size": lambda: im.resize((im.width // 2, im.height // 2), Image.BILINEAR),
          "brighter_flatter": lambda: ImageEnhance.Contrast(
              ImageEnhance.Brightness(im).enhance(1.2)).enhance(0.8)}[kind]()
    im.save(dest, quality=80)  # JPEG: re-encoded too
    return dest


@pytest.mark.parametrize("kind", ["flip", "rotate90", "half_size", "brighter_flatter"])
def test_near_copies_are_found_by_descriptor(sample_model, tmp_path, kind):
    original = files_of("train")[3]
    copy = planted(original, tmp_path / "copy.jpg", kind)
    model = load_model(sample_model)
    (c,) = mb.training_copies(model, [sha256_file(copy)], [copy])
    assert c.kind == "near" and c.split == "train" and c.similarity >= mb.NEAR_SIMILARITY, c


def test_an_unrelated_image_is_no_copy(sample_model, tmp_path):
    rng = np.random.default_rng(3)
    noise = (rng.random((200, 160)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    stripes = np.tile((np.arange(240) // 12 % 2 * 255).astype(np.uint8), (240, 1))
    model = load_model(sample_model)
    copies = mb.training_copies(model, ["", ""], [tmp_path / "noise.png", stripes])
    assert [c.kind for c in copies] == ["", ""]


def test_without_images_or_descriptors_only_exact_copies_count(tmp_path):
    train = files_of("train")
    path = with_table(tmp_path / "h.onnx", train[:5], [], descriptors=False)
    model = load_model(path)
    copy = planted(train[0], tmp_path / "c.jpg", "flip")
    copies = mb.training_copies(model, [sha256_file(train[0]), sha256_file(copy)],
                                [train[0], copy])
    assert [c.text for c in copies] == ["exact:train", ""]
    assert mb.copies_summary(copies, mb.training_data(model))["near_checked"] is False


def test_a_table_of_another_descriptor_kind_gives_exact_lookups_only(sample_model, tmp_path,
                                                                       monkeypatch):
    copy = planted(files_of("train")[3], tmp_path / "copy.jpg", "flip")
    monkeypatch.setattr(mb, "descriptor_kind", lambda: "fingerprint-other/2")
    (c,) = mb.training_copies(load_model(sample_model), [sha256_file(copy)], [copy])
    assert not c


def test_a_table_changed_after_export_is_refused(tmp_path):
    train = files_of("train")[:3]
    _, other = mb.encode([sha256_file(train[0])], [])
    path = with_table(tmp_path / "t.onnx", train, [], descriptors=False, text_override=other)
    model = load_model(path)  # the model itself is intact: its digest leaves the entry out
    with pytest.raises(mb.MembershipError, match="changed after export"):
        mb.training_copies(model, [sha256_file(train[0])])


def test_a_stripped_table_is_refused(sample_model, tmp_path):
    proto = onnx.load(str(sample_model))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != mb.ENTRY]
    del proto.metadata_props[:]
    for key, value in kept:
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(tmp_path / "s.onnx"))
    with pytest.raises(mb.MembershipError, match="has no 'fxscore.training_data' entry"):
        mb.training_data(load_model(tmp_path / "s.onnx"))


def test_a_model_without_a_table_says_why(tiny_model):
    model = load_model(tiny_model)
    assert mb.training_data(model) is None
    with pytest.raises(mb.MembershipError, match="--no-training-hashes"):
        mb.training_copies(model, ["0" * 64])


# ---------------------------------------------------------------------------- eval rows

def test_mark_rows_sets_a_column_and_counts_by_split(sample_model, tmp_path):
    train, val, test = files_of("train"), files_of("val"), files_of("test")
    copy = planted(train[5], tmp_path / "copy.jpg", "flip")
    files = [train[0], val[1], test[0], copy, tmp_path / "gone.png"]
    rows = [{"path": str(f), "sha256": sha256_file(f) if f.exists() else "",
             "error": "" if f.exists() else "unreadable"} for f in files]
    summary = mb.mark_rows(load_model(sample_model), rows, files)
    assert [r["training_copy"] for r in rows] == ["exact:train", "exact:val", "", "near:train",
                                                  ""]
    assert summary["available"] is True
    assert (summary["exact"], summary["near"], summary["checked"]) == (2, 1, 5)
    assert summary["by_split"] == {"train": 2, "val": 1}
    json.dumps(summary)  # goes into metrics.json as it is


def test_mark_rows_on_a_model_without_a_table(tiny_model):
    rows = [{"sha256": "0" * 64, "error": ""}]
    summary = mb.mark_rows(load_model(tiny_model), rows, None)
    assert summary["available"] is False and "--no-training-hashes" in summary["why"]
    assert rows[0]["training_copy"] == ""


def test_exact_lookups_import_nothing_beyond_numpy():
    # `fxscore run --mark-training-copies` must not pull scipy or PIL into the scoring path
    code = ("import sys; import fxscore.membership as m; m.exact_split; "
            "assert 'scipy' not in sys.modules and 'torch' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------- fxscore eval

@pytest.fixture(scope="module")
def hashes_model(tmp_path_factory) -> Path:
    """Trained on sample_data's train/ and val/, hashes only: exact copies, nothing else.
    (sample_data's independently drawn phantoms are smooth enough that some of them reach the
    near-copy similarity of others; real radiographs do not, see the module doc.)"""
    return with_table(tmp_path_factory.mktemp("h") / "h.onnx", files_of("train"),
                      files_of("val"), descriptors=False)


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory) -> Path:
    """2 training + 1 validation file among 6 test files, under other names."""
    import os

    root = tmp_path_factory.mktemp("eval")
    picks = {"fractured": [("train", 0), ("train", 1), ("test", 0), ("test", 1), ("test", 2)],
             "not fractured": [("val", 0), ("test", 0), ("test", 1), ("test", 2)]}
    for cls, sources in picks.items():
        (root / cls).mkdir()
        for k, (split, i) in enumerate(sources):
            src = sorted((SAMPLE_DATA / split / cls).iterdir())[i]
            os.link(src, root / cls / f"x{k}{src.suffix}")
    return root


def invoke_eval(*args):
    from click.testing import CliRunner

    from fxscore.cli import cli

    return CliRunner().invoke(cli, ["eval", *map(str, args), "--bootstrap", "0", "--quiet"])


def test_eval_counts_the_training_copies_and_warns(hashes_model, eval_folder, tmp_path):
    r = invoke_eval(eval_folder, "--model", hashes_model, "--report", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    assert ("WARNING: 3 of 9 evaluated images are copies of the model's own training or "
            "validation images (3 exact, 0 near; train 2, val 1)") in r.stderr
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    c = m["training_copies"]
    assert (c["exact"], c["excluded"], m["data"]["files"]) == (3, 0, 9)
    assert sorted(f["path"].rsplit(".", 1)[0] for f in c["files"]) == [
        "fractured/x0", "fractured/x1", "not fractured/x0"]
    assert all(f["copy"].startswith("exact:") for f in c["files"])
    assert "including_training_copies" not in m


def test_eval_can_exclude_the_copies_and_reports_both(hashes_model, eval_folder, tmp_path):
    from fxscore.evaluate import evaluate

    model = load_model(hashes_model)
    every = evaluate(eval_folder, model, n_bootstrap=0)
    ev = evaluate(eval_folder, model, n_bootstrap=0, exclude_training_copies=True)
    assert len(ev.rows) == 6 and not any(r["training_copy"] for r in ev.rows)
    m = ev.metrics
    assert m["training_copies"]["excluded"] == 3 and m["data"]["files"] == 6
    assert m["including_training_copies"]["files"] == 9
    assert m["including_training_copies"]["roc_auc"] == every.metrics["roc_auc"]
    r = invoke_eval(eval_folder, "--model", hashes_model, "--exclude-training-copies")
    assert r.exit_code == 0 and "Excluded 3 of 9 evaluated images" in r.stdout, r.output
    assert "WARNING" not in r.stderr


def test_eval_of_a_model_without_a_table_says_it_cannot_tell(tiny_model, eval_folder):
    from fxscore.evaluate import evaluate

    c = evaluate(eval_folder, load_model(tiny_model), n_bootstrap=0).metrics["training_copies"]
    assert c["available"] is False and "carries no training-data hashes" in c["why"]
    r = invoke_eval(eval_folder, "--model", tiny_model)
    assert r.exit_code == 0 and "WARNING" not in r.stderr, r.output


# ---------------------------------------------------------------------------- fxscore run

def test_run_rows_are_marked_by_exact_content_only(sample_model, tmp_path):
    train, val, test = files_of("train"), files_of("val"), files_of("test")
    flipped = planted(train[2], tmp_path / "f.jpg", "flip")
    files = [train[0], val[0], test[0], flipped]
    batches = [[{"path": "a", "sha256": sha256_file(files[0])},
                {"path": "b", "sha256": sha256_file(files[1])}],
               [{"path": "c", "sha256": sha256_file(files[2])},
                {"path": "d", "sha256": sha256_file(files[3])}, {"path": "e", "sha256": ""}]]
    closed = []

    class Source(list):
        def close(self):
            closed.append(True)

    marked = mb.MarkedBatches(Source(batches), mb.run_table(load_model(sample_model)))
    got = [r[mb.IN_TRAINING] for rows in marked for r in rows]
    assert got == ["train", "val", "", "", ""]  # the flipped copy is eval's job, not run's
    marked.close()
    assert closed == [True]


def test_marking_needs_a_table(tiny_model):
    with pytest.raises(mb.MembershipError, match="--mark-training-copies: .*--no-training"):
        mb.run_table(load_model(tiny_model))


def test_info_names_the_table(sample_model, tiny_model):
    from fxscore.info import describe, format_info

    text = format_info(describe(load_model(sample_model)))
    assert "training data" in text and "sha256 of 160 distinct images (train 120, val 40)" \
        in text, text
    assert "training data" not in format_info(describe(load_model(tiny_model)))


@pytest.mark.realdata
def test_the_public_test_split_is_copies_of_the_public_train_and_val(real_data_root, tmp_path):
    """The public set's own split leaks: of its 340 test files, 334 have the bytes of a train or
    val file and the other 6 are resized / re-encoded copies of one (README, "Membership"), as
    `fxscore audit` finds pixel by pixel."""
    from fxscore.evaluate import evaluate

    files = {s: [p for _, p in find_images(real_data_root / s)] for s in ("train", "val")}
    shas = {s: [sha256_file(p) for p in fs] for s, fs in files.items()}
    first: dict[str, Path] = {}
    for s in ("train", "val"):
        for sha, p in zip(shas[s], files[s]):
            first.setdefault(sha, p)
    desc = dict(zip(first, mb.describe_files(list(first.values()))))
    summary, text = mb.encode(shas["train"], shas["val"], desc)
    assert summary["contents"] == 2497 and summary["bytes"] < 2497 * 140  # as documented
    path = tmp_path / "m.onnx"
    make_model(path, with_meta=False)
    write_model(with_entry(path.read_bytes(), mb.ENTRY, text),
                dataclasses.replace(make_meta(), training_data=summary), path)
    c = evaluate(real_data_root / "test", load_model(path), n_bootstrap=0).metrics[
        "training_copies"]
    assert (c["checked"], c["exact"], c["near"]) == (340, 334, 6), c


def test_the_reports_show_the_copies(hashes_model, eval_folder, tmp_path):
    from fxscore.evaluate import evaluate
    from fxscore.report import format_text, render_html

    ev = evaluate(eval_folder, load_model(hashes_model), n_bootstrap=0)
    sentence = ("3 of 9 evaluated images are copies of the model's own training or validation "
                "images (3 exact, 0 near; train 2, val 1)")
    assert sentence in format_text(ev)
    page = render_html(ev)
    assert "<b>Training copies.</b> " + sentence.replace("'", "&#x27;") in page
    excluded = evaluate(eval_folder, load_model(hashes_model), n_bootstrap=0,
                        exclude_training_copies=True)
    assert "excluded, the metrics are on the other files; with them, ROC-AUC" in \
        format_text(excluded)


def test_fxscore_run_marks_training_copies(sample_model, eval_folder, tmp_path, tiny_model):
    import csv

    from click.testing import CliRunner

    from fxscore.cli import cli

    out = tmp_path / "preds.csv"
    args = ["run", str(eval_folder), "--model", str(sample_model), "--out", str(out), "--quiet",
            "--mark-training-copies"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-1] == "in_training"
    marked = sorted((row["path"].rsplit(".", 1)[0], row["in_training"]) for row in rows
                    if row["in_training"])
    assert marked == [("fractured/x0", "train"), ("fractured/x1", "train"),
                      ("not fractured/x0", "val")]
    assert CliRunner().invoke(cli, args).exit_code == 0  # resumes: same columns
    r = CliRunner().invoke(cli, ["run", str(eval_folder), "--model", str(tiny_model), "--out",
                                 str(tmp_path / "t.csv"), "--quiet", "--mark-training-copies"])
    assert r.exit_code == 1 and "carries no training-data hashes" in r.output, r.output
    assert not (tmp_path / "t.csv").exists()


def test_the_descriptor_kind_changes_with_the_descriptor(monkeypatch):
    from fxscore import fingerprint as fp

    before = mb.descriptor_kind()
    real = fp.descriptors
    monkeypatch.setattr(fp, "descriptors", lambda thumb: real(thumb)[::-1].copy())
    mb.descriptor_kind.cache_clear()
    try:
        assert mb.descriptor_kind() != before
    finally:
        monkeypatch.undo()
        mb.descriptor_kind.cache_clear()
    assert mb.descriptor_kind() == before
