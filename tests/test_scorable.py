"""fxscore.scorable: which DICOM files are scored, and why the others are excluded."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset

from fxscore.images import ImageReadError
from fxscore.scorable import (DEFAULT_MODALITIES, classify, describe, is_for_processing,
                              parse_modalities, read_header, reason)

DX = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"


def dicom_bytes(sop_class: str, modality: str | None = "DX", *, pixels: bool = True,
                syntax=uid.ExplicitVRLittleEndian, **attrs) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, "1.2.3.4"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.5"
    if modality:
        ds.Modality = modality
    for key, value in attrs.items():
        setattr(ds, key, value)
    if pixels:
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("sop_class, modality, expected", [
    ("1.2.840.10008.5.1.4.1.1.88.11", "SR", "structured report"),  # Basic Text SR
    ("1.2.840.10008.5.1.4.1.1.88.22", "SR", "structured report"),  # Enhanced SR
    ("1.2.840.10008.5.1.4.1.1.88.67", "SR", "structured report"),  # X-Ray Radiation Dose SR
    ("1.2.840.10008.5.1.4.1.1.88.59", "KO", "key object selection"),
    ("1.2.840.10008.5.1.4.1.1.11.1", "PR", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.9.1.1", "ECG", "waveform"),
    ("1.2.840.10008.5.1.4.1.1.104.1", "DOC", "encapsulated PDF"),
    ("1.2.840.10008.5.1.4.1.1.104.2", "DOC", "encapsulated document"),  # CDA
    ("1.2.840.10008.5.1.4.1.1.481.5", "RTPLAN", "RT plan"),
    ("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT", "RT structure set"),
    ("1.2.840.10008.5.1.4.1.1.481.4", "RTRECORD", "RT treatment record"),
])
def test_non_image_sop_classes_are_excluded_by_kind(sop_class, modality, expected):
    data = dicom_bytes(sop_class, modality, pixels=False)
    assert classify(data) == expected
    assert classify(data, None) == expected  # --modality all does not make a report an image


def test_a_dicomdir_is_excluded(tmp_path):
    from pydicom.data import get_testdata_file
    path = get_testdata_file("DICOMDIR", download=False)
    if path is None:
        pytest.skip("pydicom's DICOMDIR test file is not installed")
    assert classify(path) == "DICOMDIR"


def test_an_image_class_without_pixel_data_is_excluded():
    assert classify(dicom_bytes(DX, pixels=False)) == "no pixel data"
    assert classify(dicom_bytes(CT, "CT", pixels=False)) == "no pixel data"  # before modality


@pytest.mark.parametrize("sop_class, modality", [(DX, "DX"), (CR, "CR"), (SC, "RG")])
def test_projection_radiographs_are_scored_by_default(sop_class, modality):
    assert classify(dicom_bytes(sop_class, modality)) is None


def test_other_modalities_are_excluded_unless_selected():
    ct = dicom_bytes(CT, "CT")
    assert classify(ct) == "CT"
    assert classify(ct, parse_modalities("all")) is None
    assert classify(ct, parse_modalities("CT,DX")) is None
    assert classify(dicom_bytes(DX, "DX"), parse_modalities("CT")) == "DX"


def test_a_missing_modality_is_taken_from_the_sop_class_where_it_is_fixed():
    assert classify(dicom_bytes(CR, None)) is None  # CR Image Storage: modality CR
    assert classify(dicom_bytes(SC, None)) == "no modality"
    assert classify(dicom_bytes(SC, None), None) is None


@pytest.mark.parametrize("data", [
    dicom_bytes(DX_FOR_PROCESSING, "DX", PresentationIntentType="FOR PROCESSING"),
    dicom_bytes(DX_FOR_PROCESSING, "DX"),
    dicom_bytes(DX, "DX", PresentationIntentType="FOR PROCESSING"),
])
def test_for_processing_images_are_excluded_unless_asked_for(data):
    assert classify(data) == "For Processing"
    assert classify(data, None) == "For Processing"
    assert classify(data, for_processing=True) is None
    assert is_for_processing(read_header(data).ds)


def test_for_presentation_is_not_for_processing():
    data = dicom_bytes(DX, "DX", PresentationIntentType="FOR PRESENTATION")
    assert classify(data) is None
    assert not is_for_processing(read_header(data).ds)


def test_deflated_headers_are_read_without_inflating_the_pixels():
    data = dicom_bytes(DX, "DX", syntax=uid.DeflatedExplicitVRLittleEndian)
    header = read_header(data)
    assert header.has_pixels and "PixelData" not in header.ds
    assert classify(data) is None


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", ["x.png", "x.dcm", "noext"])
def test_non_dicom_content_is_always_scored_whatever_its_name(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(png_bytes())
    assert read_header(path) is None
    assert classify(path, parse_modalities("CT")) is None


def test_a_preamble_less_dicom_file_is_classified():
    data = dicom_bytes(CT, "CT")[128 + 4:]  # no preamble, no DICM: the meta group first
    assert classify(data, name="old.dcm") == "CT"


def test_a_damaged_dcm_file_is_an_error_not_an_exclusion():
    with pytest.raises(ImageReadError, match=r"^bad\.dcm: not a readable DICOM file"):
        classify(b"\x01\x02garbage that is no dicom at all" * 4, name="bad.dcm")


def test_classify_accepts_a_dataset_with_its_pixel_data():
    ds = Dataset()
    ds.SOPClassUID, ds.Modality = DX, "DX"
    assert classify(ds) == "no pixel data"
    ds.PixelData = b"\0\0"
    assert classify(ds) is None
    assert reason(ds, True, DEFAULT_MODALITIES) is None


@pytest.mark.parametrize("text, expected", [
    (None, DEFAULT_MODALITIES), ("", DEFAULT_MODALITIES), ("all", None), ("ALL", None),
    ("cr, dx", frozenset({"CR", "DX"})), (["CT", "MR"], frozenset({"CT", "MR"})),
    ("DX,all", None),
])
def test_parse_modalities(text, expected):
    assert parse_modalities(text) == expected


@pytest.mark.parametrize("bad", ["C-T", "D X;rm", "A" * 17])
def test_parse_modalities_refuses_what_is_no_modality_code(bad):
    with pytest.raises(ValueError, match="not a DICOM modality code"):
        parse_modalities(bad)


def test_describe_counts_reads_like_the_summary():
    assert describe({"CT": 12, "structured report": 3, "DICOMDIR": 1}) == \
        "12 CT, 3 structured reports, 1 DICOMDIR"
    assert describe({"no pixel data": 2, "For Processing": 1}) == \
        "2 without pixel data, 1 For Processing image"
    assert describe({}) == ""
