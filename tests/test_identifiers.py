"""fxscore.identifiers: --dicom-columns, non-identifying by default, PHI only when named."""
from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from fxscore.identifiers import (DEFAULT_COLUMNS, PHI_KEYWORDS, ColumnError, dicom_columns,
                                 parse_names, phi_named)


def header() -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.Modality = "DX"
    ds.BodyPartExamined = "HAND"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-0042"
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "ACC9"
    ds.StudyDate = "20240102"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImageComments = "line one\nline two"
    return ds


def test_the_default_set_identifies_images_not_people():
    assert parse_names(None) == DEFAULT_COLUMNS
    assert parse_names("default") == DEFAULT_COLUMNS
    assert not set(DEFAULT_COLUMNS) & PHI_KEYWORDS
    cols = dicom_columns(header())
    assert list(cols) == list(DEFAULT_COLUMNS)
    assert cols["StudyInstanceUID"] == "1.2.3" and cols["Modality"] == "DX"
    assert cols["ViewPosition"] == ""  # absent -> empty, never a crash
    assert "Doe^Jane" not in cols.values() and "MRN-0042" not in cols.values()


def test_identifying_attributes_only_when_named():
    names = parse_names("default,PatientID,StudyDate,AccessionNumber")
    assert names[:len(DEFAULT_COLUMNS)] == DEFAULT_COLUMNS
    cols = dicom_columns(header(), names)
    assert (cols["PatientID"], cols["StudyDate"], cols["AccessionNumber"]) == \
        ("MRN-0042", "20240102", "ACC9")
    assert phi_named(names) == ["PatientID", "StudyDate", "AccessionNumber"]
    assert phi_named(DEFAULT_COLUMNS) == []


@pytest.mark.parametrize("name", ["PatientName", "PatientID", "PatientBirthDate",
                                  "AccessionNumber", "StudyDate", "StudyTime"])
def test_hipaa_identifiers_are_known_as_such(name):
    assert name in PHI_KEYWORDS


def test_values_become_one_line_cells():
    cols = dicom_columns(header(), ("ImageType", "ImageComments", "PatientName"))
    assert cols == {"ImageType": "ORIGINAL\\PRIMARY", "ImageComments": "line one line two",
                    "PatientName": "Doe^Jane"}


def test_non_dicom_files_get_empty_cells():
    assert dicom_columns(None, ("StudyInstanceUID", "Modality")) == \
        {"StudyInstanceUID": "", "Modality": ""}


def test_order_is_kept_and_duplicates_dropped():
    assert parse_names(["Modality", "StudyInstanceUID,Modality"]) == ("Modality",
                                                                     "StudyInstanceUID")


@pytest.mark.parametrize("bad, message", [
    ("Patientid", "not a DICOM keyword"),
    ("patient_id", "not a DICOM keyword"),
    ("ReferencedImageSequence", "sequence or binary"),
    ("PixelData", "sequence or binary"),
])
def test_bad_names_are_refused_with_the_reason(bad, message):
    with pytest.raises(ColumnError, match=message):
        parse_names(f"default,{bad}")
