"""A PACS-like export end to end: selection, identifiers, study rows and SRs, through the
library and through `fxscore run` / `fxscore studies`."""
from __future__ import annotations

import io
import shutil
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner

import pacs_export
from fxscore import csvsafe
from fxscore.cli import cli
from fxscore.files import find_images
from fxscore.identifiers import dicom_columns
from fxscore.images import read_image
from fxscore.scorable import classify, describe, read_header
from fxscore.studies import summarise
from test_sr import dciodvfy


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return pacs_export.make_export(tmp_path_factory.mktemp("pacs") / "export")


def test_selection_scores_the_radiographs_and_excludes_the_rest_by_reason(export):
    found = dict(find_images(export))
    assert set(found) == set(pacs_export.SCORED) | set(pacs_export.EXCLUDED)
    excluded: Counter = Counter()
    for rel, path in found.items():
        reason = classify(path, name=rel)
        if reason:
            assert pacs_export.EXCLUDED[rel] == reason, rel
            excluded[reason] += 1
        else:
            assert rel in pacs_export.SCORED, rel
            assert read_image(path).size  # and it decodes (RLE, JPEG-LS, MONOCHROME1 ...)
    assert excluded == Counter(pacs_export.EXCLUDED_COUNTS)
    assert describe(excluded) == ("3 CT, 1 DICOMDIR, 1 For Processing image, "
                                  "1 key object selection, 1 structured report")


def test_study_rows_and_srs_from_the_scored_images(export, tmp_path):
    from fxscore.sr import write_sr

    rows = []
    probabilities = iter([0.1, 0.8, 0.3, 0.2, 0.4, 0.9])
    model = {"model_id": "feedfacecafe", "name": "test-model", "version": "1"}
    for rel in sorted(pacs_export.SCORED):
        path = export / rel
        header = read_header(path, name=rel)
        ds = header.ds if header else None
        p = next(probabilities)
        label = "fractured" if p >= 0.5 else "not fractured"
        row = {"path": rel, "probability": p, "label": label, "threshold": 0.5,
               "model_id": model["model_id"], "sha256": "", "error": "",
               "_where": rel, **dicom_columns(ds)}
        rows.append(row)
        if ds is not None:
            sr = write_sr(ds, p, label, 0.5, model, tmp_path / "sr")
            errors, _ = dciodvfy(sr)
            assert errors == [], (rel, errors)
            written = pydicom.dcmread(sr)
            assert written.StudyInstanceUID == ds.StudyInstanceUID
            assert written.PatientID == ds.PatientID
    assert len(list((tmp_path / "sr").iterdir())) == 5  # one per scored DICOM image

    studies = {s.study: s for s in summarise(rows)}
    a, b = studies[pacs_export.STUDY_A], studies[pacs_export.STUDY_B]
    assert (a.images, a.label, a.max_probability) == (3, "fractured", 0.8)
    assert (b.images, b.label, b.max_probability) == (2, "not fractured", 0.4)
    assert studies["photos"].key == "folder" and studies["photos"].images == 1
    assert pacs_export.STUDY_C not in studies  # the CT series was never scored


def test_fxscore_run_then_studies_on_the_export(export, tmp_path, tiny_model):
    out, sr_dir = tmp_path / "rows.csv", tmp_path / "sr"
    r = CliRunner().invoke(cli, ["run", str(export), "-m", str(tiny_model), "--out", str(out),
                                 "--dicom-columns", "--sr-out", str(sr_dir), "-q"])
    assert r.exit_code == 0, r.output
    rows = list(csvsafe.read_dicts(io.StringIO(out.read_text(encoding="utf-8"), newline="")))
    assert {row["path"] for row in rows} == set(pacs_export.SCORED)
    assert all(row["StudyInstanceUID"] == pacs_export.SCORED[row["path"]] for row in rows)
    srs = sorted(sr_dir.iterdir())
    assert len(srs) == 5
    for sr in srs:
        assert dciodvfy(sr)[0] == []
    studies_csv = tmp_path / "studies.csv"
    r = CliRunner().invoke(cli, ["studies", str(out), "--out", str(studies_csv), "-q"])
    assert r.exit_code == 0, r.output
    studies = list(csvsafe.read_dicts(io.StringIO(studies_csv.read_text(encoding="utf-8"),
                                                  newline="")))
    assert {s["study"]: int(s["images"]) for s in studies} == {
        pacs_export.STUDY_A: 3, pacs_export.STUDY_B: 2, "photos": 1}
    # a rerun rewrites the same SR files, never a second copy
    r = CliRunner().invoke(cli, ["run", str(export), "-m", str(tiny_model), "--out",
                                 str(tmp_path / "again.csv"), "--dicom-columns", "--sr-out",
                                 str(sr_dir), "-q"])
    assert r.exit_code == 0 and sorted(sr_dir.iterdir()) == srs


def test_fxscore_studies_writes_one_valid_sr_per_study(export, tmp_path, tiny_model):
    out, sr_dir = tmp_path / "rows.csv", tmp_path / "study-sr"
    r = CliRunner().invoke(cli, ["run", str(export), "-m", str(tiny_model), "--out", str(out),
                                 "--dicom-columns", "-q"])
    assert r.exit_code == 0, r.output
    args = ["studies", str(out), "--out", str(tmp_path / "studies.csv"), "--sr-out", str(sr_dir),
            "--input", str(export), "-m", str(tiny_model)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert ("2 study SRs written to" in r.stderr
            and "1 study by folder have no StudyInstanceUID" in r.stderr)
    srs = sorted(sr_dir.iterdir())
    assert len(srs) == 2
    rows = list(csvsafe.read_dicts(io.StringIO(out.read_text(encoding="utf-8"), newline="")))
    for path in srs:
        assert dciodvfy(path)[0] == []
        sr = pydicom.dcmread(path)
        mine = [row for row in rows if row["StudyInstanceUID"] == sr.StudyInstanceUID]
        evidence = {ref.ReferencedSOPInstanceUID
                    for study in sr.CurrentRequestedProcedureEvidenceSequence
                    for series in study.ReferencedSeriesSequence
                    for ref in series.ReferencedSOPSequence}
        assert evidence == {row["SOPInstanceUID"] for row in mine}
    # a rerun rewrites the same files
    assert CliRunner().invoke(cli, args).exit_code == 0 and sorted(sr_dir.iterdir()) == srs

    # a file changed since scoring: that study gets no SR, the run says why and exits 3
    changed = tmp_path / "changed"
    shutil.copytree(export, changed)  # a copy: never change a file the other tests read
    victim = changed / "PAT2/STUDY_B/CR/IM1"
    victim.write_bytes(victim.read_bytes() + b"\0\0")
    r = CliRunner().invoke(cli, [*args[:5], str(tmp_path / "sr2"), "--input", str(changed),
                                 "-m", str(tiny_model)])
    assert r.exit_code == 3, r.output
    assert f"study {pacs_export.STUDY_B}: {victim} has changed since it was scored" in r.stderr
    assert len(list((tmp_path / "sr2").iterdir())) == 1


def test_fxscore_studies_sr_out_needs_the_input_folder(tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("path,probability,label,threshold,model_id,sha256,error\n")
    r = CliRunner().invoke(cli, ["studies", str(rows), "--sr-out", str(tmp_path / "sr")])
    assert r.exit_code == 2 and "--sr-out needs --input" in r.output
