"""Which DICOM files a radiograph model should score, decided from the header alone.

A PACS export holds more than radiographs: structured reports, key object selections,
presentation states, RT plans, waveforms, encapsulated PDFs, a DICOMDIR, CT and MR series.
None of these is a failure to read an image; they are *excluded*, with a reason, and get no
prediction row. `classify` says which, reading only the header (no pixel data is decoded, and a
deflated data set is inflated only up to its pixel data; `read_header` uses the reader's
`fxscore.dicom.read_header`):

    None                    score it
    "DICOMDIR"              and the other non-image SOP classes in `REASONS`
    "no pixel data"         an image SOP class (or an unknown one) without pixel data
    "CT", "MR", "OT", ...   a modality not selected (`--modality`, default DEFAULT_MODALITIES)
    "no modality"           an image whose header names no modality, when not `--modality all`
    "For Processing"        raw detector data (DX/MG/IO For Processing), unless asked for

Files that are not DICOM (JPEG, PNG, ...) have no modality and are always scored. The order of
the checks is the order above, so a CT slice without pixel data counts as "no pixel data".
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping

from .images import ImageReadError, open_regular, shown, sniff_format

DEFAULT_MODALITIES = frozenset({"CR", "DX", "RG"})  # projection radiography
ALL = "all"
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

# reason -> how a count of it reads in a summary ("3 structured reports")
REASONS: dict[str, tuple[str, str]] = {
    "DICOMDIR": ("DICOMDIR", "DICOMDIRs"),
    "structured report": ("structured report", "structured reports"),
    "key object selection": ("key object selection", "key object selections"),
    "presentation state": ("presentation state", "presentation states"),
    "waveform": ("waveform", "waveforms"),
    "encapsulated PDF": ("encapsulated PDF", "encapsulated PDFs"),
    "encapsulated document": ("encapsulated document", "encapsulated documents"),
    "RT plan": ("RT plan", "RT plans"),
    "RT structure set": ("RT structure set", "RT structure sets"),
    "RT treatment record": ("RT treatment record", "RT treatment records"),
    "no pixel data": ("without pixel data", "without pixel data"),
    "no modality": ("without modality", "without modality"),
    "For Processing": ("For Processing image", "For Processing images"),
}

FOR_PROCESSING_WARNING = (
    "scoring For Processing images (raw detector data, before the manufacturer's image "
    "processing): the model was validated on images For Presentation, so their scores are not "
    "validated")

_DICOMDIR = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
_KEY_OBJECT = "1.2.840.10008.5.1.4.1.1.88.59"
_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
# SOP class UID prefixes of whole families that never hold an image (PS3.4 Annex B)
_FAMILIES = (
    ("1.2.840.10008.5.1.4.1.1.88.", "structured report"),  # every SR IOD, incl. CAD, dose
    ("1.2.840.10008.5.1.4.1.1.11.", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.9.", "waveform"),  # ECG, audio, haemodynamic, ...
    ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated document"),  # PDF, CDA, STL, OBJ, MTL
)
_RT = {
    "1.2.840.10008.5.1.4.1.1.481.3": "RT structure set",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT plan",
    "1.2.840.10008.5.1.4.1.1.481.8": "RT plan",  # RT Ion Plan
    "1.2.840.10008.5.1.4.1.1.481.4": "RT treatment record",
    "1.2.840.10008.5.1.4.1.1.481.6": "RT treatment record",  # brachy
    "1.2.840.10008.5.1.4.1.1.481.7": "RT treatment record",  # summary
    "1.2.840.10008.5.1.4.1.1.481.9": "RT treatment record",  # ion beams
}
# For Processing image SOP classes (raw detector data): DX, mammography, intra-oral
_FOR_PROCESSING = {"1.2.840.10008.5.1.4.1.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.2.1",
                   "1.2.840.10008.5.1.4.1.1.1.3.1"}
# image SOP classes whose IOD fixes the modality, for headers that omit (0008,0060)
_IMPLIED_MODALITY = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX", "1.2.840.10008.5.1.4.1.1.1.1.1": "DX",
    "1.2.840.10008.5.1.4.1.1.1.2": "MG", "1.2.840.10008.5.1.4.1.1.1.2.1": "MG",
    "1.2.840.10008.5.1.4.1.1.1.3": "IO", "1.2.840.10008.5.1.4.1.1.1.3.1": "IO",
}
def parse_modalities(value: str | Iterable[str] | None) -> frozenset[str] | None:
    """`--modality` text ("CR,DX", "all", repeated options) -> the modality set, or None for
    all. Codes are DICOM's (CR, DX, RG, MG, CT, ...), upper-cased; empty means the default."""
    if value is None:
        return DEFAULT_MODALITIES
    parts = [value] if isinstance(value, str) else list(value)
    codes = {c.strip() for p in parts for c in p.replace(" ", ",").split(",") if c.strip()}
    if not codes:
        return DEFAULT_MODALITIES
    if any(c.lower() == ALL for c in codes):
        return None
    bad = sorted(c for c in codes if not (c.isalnum() and len(c) <= 16))
    if bad:
        raise ValueError(f"not a DICOM modality code: {', '.join(bad)} (expected e.g. CR,DX,RG "
                         "or all)")
    return frozenset(c.upper() for c in codes)


def classify(source: Any, modalities: frozenset[str] | None = DEFAULT_MODALITIES, *,
             for_processing: bool = False, name: str | None = None) -> str | None:
    """None if `source` should be scored, else the reason it is excluded (a key of REASONS, or
    a modality code such as "CT").

    source: a path, the file's bytes, a seekable binary file object, a `fxscore.dicom.Header`,
    or a pydicom Dataset (one read with stop_before_pixels=True cannot show whether it has
    pixel data: pass the Header from `read_header` instead).
    modalities: the modality codes to score, None for all. for_processing: score For
    Processing images too (the caller warns: FOR_PROCESSING_WARNING). name: the file name,
    for messages and for telling a preamble-less DICOM (.dcm) from other files.
    Non-DICOM content gives None. Raises ImageReadError when a DICOM header is unreadable
    (the file then becomes an error row, as any unreadable file).
    """
    header = _header_of(source, name)
    if header is None:
        return None
    return reason(header.ds, header.has_pixels, modalities, for_processing=for_processing)


def reason(ds: Any, has_pixel_data: bool, modalities: frozenset[str] | None = DEFAULT_MODALITIES,
           *, for_processing: bool = False) -> str | None:
    """`classify` on a header already read: None to score, else the exclusion reason."""
    sop = sop_class(ds)
    kind = non_image_kind(sop)
    if kind is None and "DirectoryRecordSequence" in ds:
        kind = "DICOMDIR"
    if kind:
        return kind
    if not has_pixel_data:
        return "no pixel data"
    if modalities is not None:
        modality = modality_of(ds)
        if not modality:
            return "no modality"
        if modality not in modalities:
            return modality
    if is_for_processing(ds) and not for_processing:
        return "For Processing"
    return None


def sop_class(ds: Any) -> str:
    """SOP Class UID of the data set, else the file meta's Media Storage SOP Class ("" if
    neither is there: DICOMDIRs carry theirs only in the file meta)."""
    value = ds.get("SOPClassUID")
    if not value:
        meta = getattr(ds, "file_meta", None)
        value = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return str(value or "").strip().rstrip("\x00")


def non_image_kind(sop: str) -> str | None:
    """The reason for SOP classes that never hold an image, else None (images, unknown)."""
    if sop == _DICOMDIR:
        return "DICOMDIR"
    if sop == _KEY_OBJECT:
        return "key object selection"
    if sop == _PDF:
        return "encapsulated PDF"
    if sop in _RT:
        return _RT[sop]
    for prefix, kind in _FAMILIES:
        if sop.startswith(prefix):
            return kind
    return None


def modality_of(ds: Any) -> str:
    """(0008,0060) Modality upper-cased, else the one the SOP class implies, else ""."""
    value = str(ds.get("Modality") or "").strip().upper()
    return value or _IMPLIED_MODALITY.get(sop_class(ds), "")


def is_for_processing(ds: Any) -> bool:
    """Raw detector data: a For Processing SOP class or Presentation Intent Type."""
    intent = str(ds.get("PresentationIntentType") or "").strip().upper()
    return sop_class(ds) in _FOR_PROCESSING or intent == "FOR PROCESSING"


def describe(counts: Mapping[str, int]) -> str:
    """{"structured report": 3, "DICOMDIR": 1, "CT": 12} -> "3 structured reports, 1 DICOMDIR,
    12 CT": most frequent first, then by name."""
    parts = []
    for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if n <= 0:
            continue
        one, many = REASONS.get(key, (key, key))
        parts.append(f"{n} {one if n == 1 else many}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------- reading headers

def read_header(source: Any, *, name: str | None = None):
    """The DICOM header of `source` (a path, the file's bytes, a seekable binary file object)
    as `fxscore.dicom.Header`, or None when the content is not DICOM (the reader's rule: the
    DICM marker, or a DICOM suffix on content of no other format). Never decodes pixel data;
    deflated data sets inflate only up to it. Raises ImageReadError when unreadable."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _read(io.BytesIO(bytes(source)), name or "<bytes>")
    if isinstance(source, (str, os.PathLike)):
        with open_regular(source) as f:
            return _read(f, name or shown(source))
    return _read(source, name or getattr(source, "name", None) or "<stream>")


def _header_of(source: Any, name: str | None):
    if hasattr(source, "ds") and hasattr(source, "has_pixels"):  # a dicom.Header already
        return source
    if hasattr(source, "file_meta") or type(source).__name__ in ("Dataset", "FileDataset"):
        from .dicom import Header
        has = any(t in source for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
        return Header(source, has)
    return read_header(source, name=name)


def _read(f: BinaryIO, name: str):
    from .dicom import read_header as read_dicom_header

    start = f.tell()
    fmt = sniff_format(f)
    f.seek(start)
    if fmt != "dicom" and not (fmt is None and Path(name).suffix.lower() in DICOM_SUFFIXES):
        return None
    force = fmt is None
    header = read_dicom_header(f, name, force=force)
    ds = header.ds
    if force and not (header.has_pixels or "SOPClassUID" in ds or "Modality" in ds):
        # Without the DICM marker pydicom parses anything; a .dcm file in which it finds
        # neither a SOP class, a modality nor pixel data is damaged or not DICOM at all.
        raise ImageReadError(f"{name}: not a readable DICOM file (no DICM marker, and no SOP "
                             "class, modality or pixel data found)")
    return header
