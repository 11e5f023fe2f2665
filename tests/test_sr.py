"""fxscore.sr: DICOM SR results that a PACS files in the source study, validated by dciodvfy."""
from __future__ import annotations

import os
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from fxscore.sr import SRError, build_sr, sr_path, sr_uids, write_sr

MODEL = {"model_id": "0123456789ab", "name": "fxscore-resnet18", "version": "2.0",
         "positive_class": "fractured"}


def dx_source(sop_uid: str = "1.2.826.0.1.3680043.8.498.1001") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray For Presentation
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2002"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3003"
    ds.PatientName, ds.PatientID = "Doe^Jane", "MRN-0042"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240102", "101010", "S1"
    ds.AccessionNumber, ds.ReferringPhysicianName = "ACC9", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, 1
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    return ds


def dciodvfy(path) -> tuple[list[str], list[str]]:
    """(errors, warnings) from dicom3tools' IOD validator."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (Debian's dicom3tools) must be installed in CI (.ci/run)")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    r = subprocess.run(["timeout", "60", tool, str(path)], capture_output=True, text=True)
    lines = (r.stdout + r.stderr).splitlines()
    return ([x for x in lines if x.startswith("Error")],
            [x for x in lines if x.startswith("Warning")])


def content_of(path):
    sr = hd.sr.srread(path)
    (group,) = sr.content.get_image_measurement_groups()
    return sr, group


@pytest.mark.parametrize("probability, finding", [(0.73, "Present"), (0.12, "Absent"),
                                                  (0.5, "Present")])
def test_the_sr_is_valid_and_carries_the_result(tmp_path, probability, finding):
    src = dx_source()
    path = write_sr(src, probability, "fractured" if probability >= 0.5 else "not fractured",
                    0.5, MODEL, tmp_path)
    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    assert warnings == [], warnings  # none today; a new one should be looked at, then allowed

    ds = pydicom.dcmread(path)
    assert ds.VerificationFlag == "UNVERIFIED" and ds.CompletionFlag == "COMPLETE"
    assert ds.Modality == "SR" and "PixelData" not in ds
    for kw in ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "StudyDate",
               "AccessionNumber", "StudyID"):
        assert ds[kw].value == src[kw].value, kw
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID

    sr, group = content_of(path)
    (measurement,) = group.get_measurements()
    assert measurement.name == pydicom.sr.codedict.codes.DCM.Probability
    assert measurement.value == pytest.approx(probability)
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.name.value == "125605004" and evaluation.name.scheme_designator == "SCT"
    assert evaluation.value.meaning == finding
    assert group.source_images[0].referenced_sop_instance_uid == src.SOPInstanceUID
    algorithm = str(group)  # TID 4019 lives in the group
    assert "fxscore-resnet18" in algorithm and "threshold=0.5" in algorithm


def test_uids_are_derived_from_the_source_and_the_model(tmp_path):
    src = dx_source()
    first = write_sr(src, 0.7, "fractured", 0.5, MODEL, tmp_path)
    again = write_sr(src, 0.7, "fractured", 0.5, MODEL, tmp_path)
    assert first == again == sr_path(tmp_path, src, MODEL["model_id"])
    assert sorted(os.listdir(tmp_path)) == [first.name]  # rewritten, not duplicated
    uids = sr_uids(src, MODEL["model_id"])
    assert pydicom.dcmread(first).SOPInstanceUID == first.stem == uids["sop"]

    other_model = sr_uids(src, "ffffffffffff")
    other_image = sr_uids(dx_source("1.2.826.0.1.3680043.8.498.1002"), MODEL["model_id"])
    mine = sr_uids(src, MODEL["model_id"])
    assert len({mine["sop"], other_model["sop"], other_image["sop"]}) == 3
    assert mine["series"] == other_image["series"] != other_model["series"]  # one per study+model


def test_a_real_cr_header_gives_a_valid_sr(tmp_path):
    from pydicom.data import get_testdata_file
    path = get_testdata_file("6154", download=False)  # dicomdirtests/77654033/CR1/6154
    if path is None:
        pytest.skip("pydicom's dicomdirtests files are not installed")
    src = pydicom.dcmread(path, stop_before_pixels=True)
    out = write_sr(src, 0.9, "fractured", 0.43, MODEL, tmp_path)
    errors, _ = dciodvfy(out)
    assert errors == [], errors
    assert pydicom.dcmread(out).PatientID == src.PatientID


@pytest.mark.parametrize("change, message", [
    ({"probability": 1.5}, "must be in"),
    ({"probability": float("nan")}, "must be in"),
    ({"threshold": -0.1}, "must be in"),
    ({"model_info": {"name": "x"}}, "model_id"),
])
def test_bad_values_are_refused(change, message):
    args = {"probability": 0.5, "label": "fractured", "threshold": 0.5, "model_info": MODEL}
    args.update(change)
    with pytest.raises(SRError, match=message):
        build_sr(dx_source(), **args)


def test_a_source_without_uids_is_refused():
    src = dx_source()
    del src.SOPInstanceUID
    with pytest.raises(SRError, match="SOPInstanceUID"):
        build_sr(src, 0.5, "fractured", 0.5, MODEL)


def test_a_study_sr_has_a_group_per_image_and_one_for_the_study(tmp_path):
    from fxscore.sr import study_sr_uids, write_study_sr

    a, b = dx_source("1.2.826.0.1.3680043.8.498.1001"), dx_source("1.2.826.0.1.3680043.8.498.1002")
    path = write_study_sr([a, b], [0.2, 0.7], ["not fractured", "fractured"], 0.5, MODEL, tmp_path)
    errors, warnings = dciodvfy(path)
    assert errors == [] and warnings == [], (errors, warnings)
    assert path.stem == study_sr_uids(a, MODEL["model_id"])["sop"]
    again = write_study_sr([a, b], [0.2, 0.7], ["not fractured", "fractured"], 0.5, MODEL,
                           tmp_path)
    assert again == path and len(list(tmp_path.iterdir())) == 1

    sr = hd.sr.srread(path)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 3
    values = [g.get_measurements()[0].value for g in groups]
    findings = [g.get_qualitative_evaluations()[0].value.meaning for g in groups]
    assert values == pytest.approx([0.2, 0.7, 0.7])  # the study group: the maximum
    assert findings == ["Absent", "Present", "Present"]
    study_refs = {s.referenced_sop_instance_uid for s in groups[2].source_images}
    assert study_refs == {a.SOPInstanceUID, b.SOPInstanceUID}


def test_a_study_sr_needs_one_study_and_matching_lengths():
    from fxscore.sr import build_study_sr

    a, b = dx_source(), dx_source("1.2.826.0.1.3680043.8.498.1002")
    b.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.9999"
    with pytest.raises(SRError, match="share one StudyInstanceUID"):
        build_study_sr([a, b], [0.1, 0.2], ["x", "y"], 0.5, MODEL)
    with pytest.raises(SRError, match="one probability and one label"):
        build_study_sr([a], [0.1, 0.2], ["x"], 0.5, MODEL)
