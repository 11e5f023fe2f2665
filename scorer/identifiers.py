"""DICOM attributes as row columns (`--dicom-columns`), so that results can be matched back.

The default set identifies images, series and studies without identifying a person:
StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, Modality, BodyPartExamined, ViewPosition.
UIDs are opaque numbers; a PACS maps them back to the patient, and nothing else can.

Attributes that identify a person or a visit are written only when named explicitly, never by
a default or a pattern: the HIPAA Safe Harbor method (45 CFR 164.514(b)(2)) counts names,
medical record and account numbers, all elements of dates (except the year) directly related
to a person (birth, admission, the study itself) and any other unique identifying number
(accession numbers) as identifiers, and an output CSV travels further than a PACS does.
`PHI_KEYWORDS` lists the common ones so that `parse_names` can say which were asked for.
"""
from __future__ import annotations

from typing import Any, Iterable

DEFAULT_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality",
                   "BodyPartExamined", "ViewPosition")
DEFAULT = "default"  # the word that stands for DEFAULT_COLUMNS in --dicom-columns

# Attributes that identify a person or a visit (HIPAA Safe Harbor identifiers and their
# DICOM homes), written only when named.
PHI_KEYWORDS = frozenset({
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames",
    "PatientBirthDate", "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers",
    "PatientAge", "MedicalRecordLocator", "AccessionNumber", "StudyID", "StudyDate",
    "StudyTime", "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime",
    "AcquisitionDateTime", "ContentDate", "ContentTime", "InstanceCreationDate",
    "InstanceCreationTime", "AdmissionID", "AdmittingDate", "AdmittingTime",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician", "InstitutionName",
    "InstitutionAddress", "StationName", "DeviceSerialNumber", "MilitaryRank",
    "BranchOfService", "EthnicGroup", "Occupation", "PatientComments", "ImageComments",
})


_NOT_A_CELL = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}  # sequences and bulk data


class ColumnError(ValueError):
    """A --dicom-columns value names something that is not a usable DICOM keyword."""


def parse_names(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """--dicom-columns text -> keywords in order, duplicates dropped.

    "default" (or an empty value) stands for DEFAULT_COLUMNS and may be combined with more
    keywords: "default,PatientID". Each keyword must be a DICOM keyword of a value that fits
    a cell (not a sequence, not bulk data). Raises ColumnError naming the bad ones.
    """
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    parts = [value] if isinstance(value, str) or value is None else list(value)
    words = [w.strip() for p in parts for w in (p or DEFAULT).split(",")]
    names: list[str] = []
    bad: list[str] = []
    for word in words:
        expanded = DEFAULT_COLUMNS if word.lower() in (DEFAULT, "") else (word,)
        for name in expanded:
            tag = tag_for_keyword(name)
            if tag is None:
                bad.append(f"{name!r} is not a DICOM keyword (keywords are CamelCase, "
                           "e.g. StudyInstanceUID)")
            elif set(dictionary_VR(tag).split(" or ")) & _NOT_A_CELL:
                bad.append(f"{name} holds a sequence or binary data, not a cell value")
            elif name not in names:
                names.append(name)
    if bad:
        raise ColumnError("--dicom-columns: " + "; ".join(bad))
    return tuple(names)


def phi_named(names: Iterable[str]) -> list[str]:
    """The keywords among `names` that identify a person or a visit (for a warning)."""
    return [n for n in names if n in PHI_KEYWORDS]


def dicom_columns(ds: Any, names: Iterable[str] = DEFAULT_COLUMNS) -> dict[str, str]:
    """{keyword: value as text} for each name; "" where the data set lacks it or ds is None
    (non-DICOM files). Multiple values are joined with backslashes, as DICOM writes them."""
    out: dict[str, str] = {}
    for name in names:
        value = None if ds is None else ds.get(name)
        out[name] = _text(value)
    return out


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(_text(v) for v in value)
    text = str(value).strip().rstrip("\x00")
    return " ".join(text.split()) if ("\n" in text or "\r" in text) else text
