"""A small PACS-like export for tests: studies of several images, non-images, a CT series.

    root/
      DICOMDIR                          (pydicom's test DICOMDIR, copied)
      PAT1/STUDY_A/DX/IM1, IM2, IM3     DX, 12 bit: uncompressed, RLE, JPEG-LS lossless
      PAT1/STUDY_A/DX/RAW1              DX For Processing
      PAT1/STUDY_A/SR/SR1               Basic Text SR
      PAT2/STUDY_B/CR/IM1, IM2          CR, one MONOCHROME1 with PresentationLUTShape INVERSE
      PAT2/STUDY_B/KO/KO1               Key Object Selection
      PAT2/STUDY_C/CT/CT1, CT2, CT3     CT slices
      photos/hand.png                   a non-DICOM radiograph (PNG)

File names have no extension, as PACS exports often have: they are found by the DICM marker.
`EXPECTED` says what the scorer must do with them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset

STUDY_A = uid.generate_uid(entropy_srcs=["fxscore-test", "study A"])
STUDY_B = uid.generate_uid(entropy_srcs=["fxscore-test", "study B"])
STUDY_C = uid.generate_uid(entropy_srcs=["fxscore-test", "study C"])

SCORED = {  # relative path -> StudyInstanceUID ("" for non-DICOM)
    "PAT1/STUDY_A/DX/IM1": STUDY_A, "PAT1/STUDY_A/DX/IM2": STUDY_A,
    "PAT1/STUDY_A/DX/IM3": STUDY_A, "PAT2/STUDY_B/CR/IM1": STUDY_B,
    "PAT2/STUDY_B/CR/IM2": STUDY_B, "photos/hand.png": "",
}
EXCLUDED = {"DICOMDIR": "DICOMDIR", "PAT1/STUDY_A/DX/RAW1": "For Processing",
            "PAT1/STUDY_A/SR/SR1": "structured report",
            "PAT2/STUDY_B/KO/KO1": "key object selection", "PAT2/STUDY_C/CT/CT1": "CT",
            "PAT2/STUDY_C/CT/CT2": "CT", "PAT2/STUDY_C/CT/CT3": "CT"}
EXCLUDED_COUNTS = {"CT": 3, "DICOMDIR": 1, "For Processing": 1, "structured report": 1,
                   "key object selection": 1}

_DX, _DX_RAW = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1"
_CR, _CT = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.2"
_SR, _KO = "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.59"


def _base(sop_class: str, study: str, series: str, number: int, patient: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid.generate_uid(entropy_srcs=["fxscore-test", study, series,
                                                       str(number)])
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = uid.generate_uid(entropy_srcs=["fxscore-test", study, series])
    ds.PatientName, ds.PatientID = f"Test^{patient}", patient
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240102", "101010", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = f"ACC-{patient}", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, number
    return ds


def _image(ds: Dataset, modality: str, seed: int, *, bits: int = 12,
           signed: bool = False) -> Dataset:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:48]
    pixels = (np.sin(x / 5.0 + seed) * np.cos(y / 7.0) + 1) * (2 ** (bits - 2))
    pixels = pixels + rng.integers(0, 2 ** (bits - 4), pixels.shape)
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    dtype = np.int16 if signed else np.uint16
    ds.PixelData = pixels.astype(dtype).tobytes()
    return ds


def make_export(root: Path, dicomdir_source: str | Path | None = None) -> Path:
    """Write the export under `root` (created) -> root. dicomdir_source: a DICOMDIR to copy
    (default: pydicom's test file)."""
    root.mkdir(parents=True, exist_ok=True)

    def save(ds: Dataset, rel: str, syntax=None) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if syntax is not None:
            ds.compress(syntax)
        ds.save_as(path, enforce_file_format=True)

    for i, syntax in enumerate((None, uid.RLELossless, uid.JPEGLSLossless), start=1):
        ds = _image(_base(_DX, STUDY_A, "dx", i, "P1"), "DX", seed=i)
        ds.PresentationIntentType, ds.BodyPartExamined, ds.ViewPosition = \
            "FOR PRESENTATION", "HAND", "PA"
        save(ds, f"PAT1/STUDY_A/DX/IM{i}", syntax)
    raw = _image(_base(_DX_RAW, STUDY_A, "raw", 1, "P1"), "DX", seed=9)
    raw.PresentationIntentType = "FOR PROCESSING"
    save(raw, "PAT1/STUDY_A/DX/RAW1")
    sr = _base(_SR, STUDY_A, "sr", 1, "P1")
    sr.Modality, sr.ValueType, sr.CompletionFlag, sr.VerificationFlag = \
        "SR", "CONTAINER", "COMPLETE", "UNVERIFIED"
    save(sr, "PAT1/STUDY_A/SR/SR1")

    for i in (1, 2):
        ds = _image(_base(_CR, STUDY_B, "cr", i, "P2"), "CR", seed=10 + i)
        ds.BodyPartExamined = "WRIST"
        if i == 2:
            ds.PhotometricInterpretation, ds.PresentationLUTShape = "MONOCHROME1", "INVERSE"
        save(ds, f"PAT2/STUDY_B/CR/IM{i}")
    ko = _base(_KO, STUDY_B, "ko", 1, "P2")
    ko.Modality, ko.ValueType = "KO", "CONTAINER"
    save(ko, "PAT2/STUDY_B/KO/KO1")
    for i in (1, 2, 3):
        ct = _image(_base(_CT, STUDY_C, "ct", i, "P2"), "CT", seed=20 + i, bits=16,
                    signed=True)
        ct.RescaleSlope, ct.RescaleIntercept = 1, -1024
        ct.PixelPaddingValue = -2000
        save(ct, f"PAT2/STUDY_C/CT/CT{i}")

    if dicomdir_source is None:
        from pydicom.data import get_testdata_file
        dicomdir_source = get_testdata_file("DICOMDIR", download=False)
    shutil.copyfile(dicomdir_source, root / "DICOMDIR")
    (root / "photos").mkdir(exist_ok=True)
    grey = (np.mgrid[0:64, 0:64][1] * 4).astype(np.uint8)
    Image.fromarray(grey, mode="L").save(root / "photos" / "hand.png")
    return root
