"""DICOM files into one intensity image in [0, 1], the header checked before any pixel is read.

`fxscore.images.read_image` is the entry point; it hands DICOM files (found by content, or by
suffix for files without the Part 10 preamble) to `read_dicom` here.

- The header is read without the pixel data (pydicom's stop before pixels). A Deflated Explicit
  VR Little Endian data set is inflated lazily, in chunks, by `_Inflater`: reading its header
  inflates only the header, and nothing ever inflates past `MAX_DECODED_BYTES` in total
  (pydicom itself would inflate the whole file in one call, however large it claims to be).
- The decoded size, Rows x Columns x SamplesPerPixel x NumberOfFrames x bytes per sample, is
  checked against `fxscore.images.MAX_DECODED_BYTES` from that header, and Rows x Columns
  against Pillow's MAX_IMAGE_PIXELS guard, before decoding.
- Only the first frame is decoded, and for files read from disk only its bytes are read.
- Greyscale: modality LUT (Rescale Slope/Intercept or Modality LUT Sequence), then the VOI LUT or
  the first Window Center/Width, then MONOCHROME1 inverted; without a VOI, the Bits Stored range
  is black..white. For integer pixels (nearly all DICOM) this whole chain is evaluated once per
  possible stored value, with pydicom's own functions, into one float32 lookup table that is
  then indexed: the result is the element-wise chain exactly, at the cost of one table lookup
  per pixel instead of several float64 passes over the image.
- Error messages describe the file; they never quote element values (a DICOM header is full of
  patient data) nor the text of pydicom's exceptions, which can contain such values.
"""
from __future__ import annotations

import io
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from . import images
from .images import ImageReadError, luma, unit_float

_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Pixel, Float, Double Float
_DEFLATED = "1.2.840.10008.1.2.1.99"
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
_PHOTOMETRIC = frozenset(("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR") + _COLOUR)
_TAKE_CHUNK = 1 << 16  # table lookups per np.take call: indices and output stay in cache


def _pydicom(name: str):
    """pydicom, lazily (most files are not DICOM); its pixel API needs pydicom 3."""
    import pydicom
    if int(pydicom.__version__.split(".")[0]) < 3:
        raise ImageReadError(f"{name}: reading DICOM needs pydicom>=3 (installed: "
                             f"{pydicom.__version__}); run: pip install -U 'pydicom>=3'")
    return pydicom


# ---------------------------------------------------------------------------- header

@dataclass
class Header:
    """A DICOM file's data set without its pixel data, and where that pixel data is."""
    ds: Any  # pydicom Dataset, with file_meta (TransferSyntaxUID always set)
    has_pixels: bool
    inflater: "_Inflater | None" = None  # deflated data sets: positioned at the pixel element
    force: bool = False  # read without the Part 10 preamble and meta


def read_header(f: BinaryIO, name: str, *, force: bool = False) -> Header:
    """Parse a DICOM file up to its pixel data; deflated data sets inflate only that far.

    Raises ImageReadError for files pydicom cannot parse as DICOM.
    """
    pydicom = _pydicom(name)
    from pydicom.errors import InvalidDicomError

    f.seek(0)
    deflated = _deflated_meta(f)
    try:
        if deflated is not None:
            from pydicom.filereader import read_dataset
            inflater = _Inflater(f, name)
            ds = read_dataset(inflater, is_implicit_VR=False, is_little_endian=True,
                              stop_when=_at_pixels)
            ds.file_meta = deflated
            return Header(ds, _pixel_tag_next(inflater, little=True), inflater)
        f.seek(0)
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=force)
    except InvalidDicomError:
        raise ImageReadError(f"{name}: not a readable DICOM file (no DICOM File Meta "
                             "Information and no recognisable data set)") from None
    except (ImageReadError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - pydicom raises anything on a corrupt header
        raise ImageReadError(f"{name}: not a readable DICOM file: "
                             f"{images.describe_error(e, 'DICOM header')}") from e
    implicit, little = ds.original_encoding
    if "TransferSyntaxUID" not in ds.file_meta:
        # No file meta (no preamble): the encoding pydicom detected is the transfer syntax.
        from pydicom import uid
        ds.file_meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit else
                                          uid.ExplicitVRLittleEndian if little else
                                          uid.ExplicitVRBigEndian)
    return Header(ds, _pixel_tag_next(f, little=little is not False), force=force)


def _at_pixels(tag, vr, length) -> bool:
    return int(tag) in _PIXEL_TAGS


def _pixel_tag_next(f, *, little: bool) -> bool:
    """Is the element at f's position a pixel data element? (f is left where it was.)"""
    pos = f.tell()
    raw = f.read(4)
    f.seek(pos)
    if len(raw) < 4:
        return False
    group, elem = struct.unpack("<HH" if little else ">HH", raw)
    return (group << 16 | elem) in _PIXEL_TAGS


def _deflated_meta(f):
    """The File Meta Information if the transfer syntax is deflated (f left after it), else
    None. Only the meta group is parsed here: the deflated rest is for `_Inflater`."""
    if f.read(132)[128:132] != b"DICM":
        return None
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset
    try:
        first = f.read(12)
        if first[:6] == b"\x02\x00\x00\x00UL" and struct.unpack("<H", first[6:8])[0] == 4:
            # The group length says where the meta ends: nothing of the deflated stream after
            # it is parsed as if it were an element (its first bytes could look like one).
            length = struct.unpack("<L", first[8:12])[0]
            if length > 1 << 20:
                return None
            raw = io.BytesIO(first + f.read(length))
            meta = read_dataset(raw, is_implicit_VR=False, is_little_endian=True)
        else:
            f.seek(132)
            meta = read_dataset(f, is_implicit_VR=False, is_little_endian=True,
                                stop_when=lambda tag, vr, length: tag.group != 2)
        syntax = str(meta.get("TransferSyntaxUID", "")).rstrip("\0 ")
    except Exception:  # noqa: BLE001 - an odd meta group: pydicom's own reader decides
        return None
    return FileMetaDataset(meta) if syntax == _DEFLATED else None


class _Inflater:
    """A read-only, seekable file over a deflated data set, inflated on demand.

    What was inflated is kept (pydicom seeks back a few bytes while parsing), so only the
    header goes through this buffer; the pixel element is inflated straight into its own
    buffer by `read_pixel_value`. Nothing inflates past MAX_DECODED_BYTES in total.
    """

    _CHUNK = 1 << 20

    def __init__(self, raw: BinaryIO, name: str):
        self._raw, self.name = raw, name
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._limit = images.MAX_DECODED_BYTES
        self.inflated = 0

    def _more(self, max_out: int) -> bytes:
        """Up to max_out more inflated bytes; b"" at the end of the stream."""
        while not self._eof:
            data = self._z.unconsumed_tail or self._raw.read(1 << 16)
            out = self._z.decompress(data, max_out)
            if self._z.eof or (not data and not out):
                self._eof = True
            if out:
                self.inflated += len(out)
                if self.inflated > self._limit:
                    raise ImageReadError(
                        f"{self.name}: refused as a possible decompression bomb: the deflated "
                        f"data set inflates to more than {images.format_bytes(self._limit)} "
                        f"(the limit, {images.LIMIT_HINT})")
                return out
        return b""

    def _fill(self, end: int) -> None:
        while len(self._buf) < end and not self._eof:
            self._buf += self._more(self._CHUNK)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            self._fill(self._limit + 1)
            size = len(self._buf) - self._pos
        else:
            self._fill(self._pos + size)
        out = bytes(self._buf[self._pos:self._pos + size])
        self._pos += len(out)
        return out

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            self._fill(self._limit + 1)
        base = (0, self._pos, len(self._buf))[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the inflated data set")
        self._pos = base + offset
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read_pixel_value(self, nbytes: int) -> bytes:
        """The next nbytes, inflated chunk by chunk into one bytes object (BytesIO hands its
        buffer over without a copy); the header buffer is released first."""
        out = io.BytesIO()
        have = max(0, min(len(self._buf) - self._pos, nbytes))
        out.write(self._buf[self._pos:self._pos + have])
        self._buf = bytearray()
        while have < nbytes:
            chunk = self._more(min(nbytes - have, self._CHUNK))
            if not chunk:
                raise ImageReadError(f"{self.name}: file is truncated or corrupt (the deflated "
                                     f"pixel data ends after {have} of {nbytes} bytes)")
            out.write(chunk)
            have += len(chunk)
        self._pos += nbytes
        return out.getvalue()


# ---------------------------------------------------------------------------- sizes

def _frames(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _geometry(ds, name: str) -> tuple[int, int, int, int, int]:
    """(rows, columns, samples, frames, bytes per decoded sample) from the header."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 16)
    except (AttributeError, TypeError, ValueError):
        raise ImageReadError(f"{name}: DICOM file lacks valid Rows, Columns, SamplesPerPixel or "
                             "BitsAllocated") from None
    if rows <= 0 or cols <= 0 or samples <= 0 or bits <= 0:
        raise ImageReadError(f"{name}: DICOM file declares an empty image ({cols} x {rows}, "
                             f"{samples} samples, {bits} bits allocated)")
    # pydicom decodes 1-bit data to one byte per sample, 12-bit to two, and so on.
    item = 1 if bits <= 8 else 2 if bits <= 16 else 4 if bits <= 32 else 8
    return rows, cols, samples, _frames(ds), item


def decoded_bytes(ds, name: str) -> int:
    """Rows x Columns x SamplesPerPixel x NumberOfFrames x bytes per sample: what decoding
    every frame produces, the quantity MAX_DECODED_BYTES limits."""
    rows, cols, samples, frames, item = _geometry(ds, name)
    return rows * cols * samples * frames * item


def peak_bytes(header: Header, name: str) -> int:
    """Pixel memory read_dicom holds at its peak, from the header: the pixel data read (every
    frame for deflated data sets, else the first frame's bytes), the decoded frame, one more
    copy of it, and the float32 image."""
    ds = header.ds
    rows, cols, samples, frames, item = _geometry(ds, name)
    frame = rows * cols * samples * item
    held = frame * frames if header.inflater is not None else frame
    colour = str(ds.get("PhotometricInterpretation", "")).strip().upper() == "PALETTE COLOR"
    lut = rows * cols * 3 * 2 if colour else 0  # apply_color_lut: 3 x 16-bit per pixel
    return images.with_slack(held + 2 * frame + lut + 4 * rows * cols)


def check_size(header: Header, name: str) -> None:
    """Refuse, before decoding, what would decode to more than the limits allow."""
    ds = header.ds
    rows, cols, samples, frames, item = _geometry(ds, name)
    if Image.MAX_IMAGE_PIXELS and rows * cols > 2 * Image.MAX_IMAGE_PIXELS:
        # The same limit Pillow applies to other formats: compressed DICOM can be a bomb too.
        raise ImageReadError(f"{name}: refused as a possible decompression bomb: "
                             f"{cols} x {rows} pixels exceeds twice "
                             f"PIL.Image.MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS})")
    images.check_decoded(decoded_bytes(ds, name), name,
                         f"{cols} x {rows} pixels x {samples} samples x {frames} frames x "
                         f"{item * 8} bits")


# ---------------------------------------------------------------------------- reading

def read_dicom(f: BinaryIO, name: str, *, force: bool = False) -> np.ndarray:
    """A DICOM file (positioned anywhere) -> float32 (H, W) in [0, 1], its first frame."""
    header = read_header(f, name, force=force)
    ds = header.ds
    if not header.has_pixels:
        raise ImageReadError(f"{name}: DICOM file has no pixel data{_sop_class(ds)}: not an "
                             "image, or the file is truncated")
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageReadError(f"{name}: DICOM file lacks Rows/Columns")
    check_size(header, name)
    arr = _first_frame(f, header, name)
    return _intensity(ds, arr, name)


def _sop_class(ds) -> str:
    """' (Basic Text SR Storage)' for a registered SOP class; nothing for other values, which
    are file content and not quoted."""
    kind = ds.get("SOPClassUID")
    try:
        if kind is not None and kind.is_valid and kind.name != str(kind):
            return f" ({kind.name})"
    except Exception:  # noqa: BLE001 - a malformed UID is simply not named
        pass
    return ""


def _first_frame(f, header: Header, name: str) -> np.ndarray:
    from pydicom.pixels import pixel_array

    from .decoders import install as install_decoders
    install_decoders()  # fxscore's 12-bit JPEG plugin; once per process (workers included)
    ds = header.ds
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        view = _native_frame(f, header)
        if view is not None:
            return view
        if header.inflater is not None:
            _attach_inflated_pixels(header, name)
            return pixel_array(ds, index=0)
        try:
            # From the file: pydicom reads only the first frame's bytes.
            return pixel_array(f, index=0, transfer_syntax_uid=syntax)
        except Exception:  # noqa: BLE001
            # Its frame reader is stricter than its data set reader about odd encapsulations
            # (pydicom's own SC_rgb_jpeg.dcm); the size was checked, so read the whole file.
            f.seek(0)
            whole = _pydicom(name).dcmread(f, force=header.force)
            whole.file_meta.TransferSyntaxUID = syntax
            return pixel_array(whole, index=0)
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(f"{name}: cannot decode DICOM pixel data: "
                             f"{_decoder_hint(syntax, e)}") from e


_NATIVE_LITTLE = {"1.2.840.10008.1.2": True, "1.2.840.10008.1.2.1": False}  # -> implicit VR


def _native_frame(f, header: Header) -> np.ndarray | None:
    """The first frame of native little-endian greyscale pixels (8 or 16 bits allocated), as
    pydicom's pixel_array gives it, but without its copy: a read-only view of the file's bytes
    when they are already in memory (a BytesIO), else of one read of the frame. Unused high
    bits are corrected as pydicom does (shifted out) only when some pixel has them set. None
    for everything else, and for anything unexpected at the pixel element: pydicom decodes it.
    """
    ds = header.ds
    implicit = _NATIVE_LITTLE.get(str(ds.file_meta.TransferSyntaxUID))
    if implicit is None or header.inflater is not None or sys.byteorder != "little":
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        allocated = int(ds.BitsAllocated)
        stored = int(ds.get("BitsStored") or allocated)
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        grey = str(ds.get("PhotometricInterpretation", "")).strip().upper() in (
            "MONOCHROME1", "MONOCHROME2")
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if not grey or samples != 1 or allocated not in (8, 16) or not 1 <= stored <= allocated:
        return None
    start = f.tell()
    element = f.read(8 if implicit else 12)
    f.seek(start)
    if len(element) < 8 or element[:4] != b"\xe0\x7f\x10\x00":  # (7FE0,0010) Pixel Data
        return None
    if not implicit and element[4:6] not in (b"OB", b"OW"):
        return None
    length = struct.unpack("<L", element[-4:])[0]
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    count = rows * cols
    if length == 0xFFFFFFFF or length < count * dtype.itemsize:
        return None  # encapsulated, or short: pydicom says what is wrong
    offset = start + len(element)
    getvalue = getattr(f, "getvalue", None)
    if getvalue is not None:
        buffer, at = getvalue(), offset  # a BytesIO over bytes: its value is those bytes
    else:
        f.seek(offset)
        buffer, at = f.read(count * dtype.itemsize), 0
        f.seek(start)
    if len(buffer) < at + count * dtype.itemsize:
        return None
    arr = np.frombuffer(buffer, dtype=dtype, count=count, offset=at).reshape(rows, cols)
    if stored < allocated:
        lo, hi = (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if signed else (0, (1 << stored) - 1)
        if (signed and int(arr.min()) < lo) or int(arr.max()) > hi:
            shift = allocated - stored  # pydicom's correction of unused bits
            arr = np.right_shift(np.left_shift(arr, shift), shift)
    return arr


def _attach_inflated_pixels(header: Header, name: str) -> None:
    """Inflate the pixel element (no more of it than the image needs) into the data set."""
    from pydicom.pixels.utils import get_expected_length
    inflater, ds = header.inflater, header.ds
    raw = inflater.read(8)
    if len(raw) < 8:
        raise ImageReadError(f"{name}: file is truncated or corrupt (no pixel data element)")
    group, elem, vr = struct.unpack("<HH2s", raw[:6])
    length = struct.unpack("<L", inflater.read(4))[0]
    if length == 0xFFFFFFFF:
        raise ImageReadError(f"{name}: invalid DICOM: encapsulated pixel data in a deflated "
                             "data set (Deflated Explicit VR Little Endian stores native pixels)")
    # Bytes past the image (and its even-length padding) are never inflated: pydicom would
    # ignore them, and a small image followed by gigabytes of zeros is a bomb too.
    expected = get_expected_length(ds, "bytes")
    value = inflater.read_pixel_value(min(length, expected + expected % 2))
    ds.add_new(group << 16 | elem, vr.decode("ascii", "replace"), value)


def _decoder_hint(syntax, e: Exception) -> str:
    """What went wrong, without the exception's text: the transfer syntax (by its registered
    name only) and what to `pip install` when a decoder plugin is missing."""
    known = _registered_name(syntax)
    where = f"transfer syntax {known} ({syntax})" if known else "an unregistered transfer syntax"
    from pydicom.pixels import get_decoder
    try:
        decoder = get_decoder(syntax)
    except Exception:  # noqa: BLE001 - a syntax pydicom has no decoder for at all
        return f"{where} cannot be decoded by pydicom ({type(e).__name__})"
    if not decoder.is_available:
        installs = []
        for dep in decoder.missing_dependencies:  # e.g. "pylibjpeg - requires pylibjpeg>=2.0 and x"
            reqs = dep.split("requires", 1)[-1].replace(" and ", " ").split()
            reqs = ["python-gdcm" if r.startswith("gdcm") else r for r in reqs if r != "numpy"]
            installs.append("pip install " + " ".join(f"'{r}'" for r in reqs))
        return (f"{where} needs a pydicom decoder plugin that is not installed; install one "
                f"of: {' | '.join(installs)}")
    return f"{where}: {images.describe_error(e, 'DICOM pixel data')}"


def _registered_name(syntax) -> str | None:
    try:
        from pydicom.uid import UID
        uid = UID(str(syntax))
        return uid.name if uid.is_transfer_syntax and uid.name != str(uid) else None
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------- intensity

def _intensity(ds, arr: np.ndarray, name: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if photometric not in _PHOTOMETRIC:
        raise ImageReadError(f"{name}: unsupported DICOM Photometric Interpretation (not one "
                             "of MONOCHROME1, MONOCHROME2, PALETTE COLOR, RGB, YBR_*)")
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        white = 2 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1
        return unit_float(luma(rgb, white))
    if photometric in _COLOUR:
        return unit_float(luma(arr, 2 ** bits - 1))
    if arr.ndim != 2:
        raise ImageReadError(f"{name}: expected one greyscale frame, got pixel shape {arr.shape}")
    return grey_intensity(ds, arr)


def grey_intensity(ds, arr: np.ndarray) -> np.ndarray:
    """Stored greyscale values -> float32 intensity, equal within 5e-7 to `_grey_chain`.

    Integer pixels: the chain is evaluated once on every value the dtype can hold (256 or
    65536), into a table. Where it is a clipped straight line (rescale, then a LINEAR or
    LINEAR_EXACT window or none, MONOCHROME1 or not: nearly every radiograph), the image is
    computed as that line in float32, a third faster than indexing the table, but only after
    the line has matched the table on every one of those values; otherwise (VOI or modality
    LUT, SIGMOID, anything unforeseen) the table is indexed. Floats: the chain itself.
    """
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2:
        # Signed values index the table through their unsigned view (-1 is entry 65535), so no
        # offset pass is needed.
        unsigned = np.dtype(f"u{arr.dtype.itemsize}")
        values = np.arange(2 ** (8 * arr.dtype.itemsize), dtype=unsigned).view(arr.dtype)
        table = _grey_chain(ds, values)
        line = _linear_form(ds)
        if line is not None and _fits(_apply_line(line, values), table):
            return _apply_line(line, arr)
        return _lookup(table, arr.view(unsigned))
    if arr.dtype.kind in "ui" and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if hi - lo < 1 << 20:  # 32-bit containers of narrow data: a table over what occurs
            table = _grey_chain(ds, np.arange(lo, hi + 1, dtype=np.int64).astype(arr.dtype))
            return _lookup(table, (arr - arr.dtype.type(lo)).astype(np.uint32))
    return _grey_chain(ds, arr)


def _fits(line_values: np.ndarray, table: np.ndarray) -> bool:
    return bool(np.max(np.abs(line_values - table)) <= 5e-7)


def _linear_form(ds) -> tuple[float, float] | None:
    """(a, b) such that the chain is clip(a * stored + b, 0, 1), read from the header as
    pydicom's functions define it; None where it is not a line. Only a proposal: the caller
    checks it against the chain on every stored value."""
    try:
        if ds.get("ModalityLUTSequence") or ds.get("VOILUTSequence"):
            return None
        slope, intercept = 1.0, 0.0
        if "RescaleSlope" in ds and "RescaleIntercept" in ds:
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        if _has_window(ds):
            function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
            center = float(_first_value(ds.WindowCenter))
            width = float(_first_value(ds.WindowWidth))
            if function == "LINEAR":
                center, width = center - 0.5, width - 1
            elif function != "LINEAR_EXACT":
                return None
            if width <= 0:
                return None
            scale, offset = 1 / width, 0.5 - center / width
        else:
            bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
            signed = int(ds.get("PixelRepresentation", 0)) == 1
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
            lo, hi = lo * slope + intercept, hi * slope + intercept
            if hi == lo:
                return None
            scale, offset = 1 / (hi - lo), -lo / (hi - lo)
        a, b = slope * scale, intercept * scale + offset
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        return (-a, 1 - b) if photometric == "MONOCHROME1" else (a, b)
    except (TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError):
        return None


def _apply_line(line: tuple[float, float], arr: np.ndarray) -> np.ndarray:
    """clip(a * arr + b, 0, 1) in float32, in cache-sized chunks. Computed as
    (arr - pivot) * a + (a * pivot + b) with an integer pivot where the line crosses 0: the
    subtraction is exact, so the one rounding left is relative to a value within [0, 1]."""
    a, b = line
    info = np.iinfo(arr.dtype)
    pivot = float(np.clip(np.rint(-b / a), info.min, info.max)) if a else 0.0
    pivot32, a32, b32 = np.float32(pivot), np.float32(a), np.float32(a * pivot + b)
    out = np.empty(arr.shape, dtype=np.float32)
    flat_in, flat_out = arr.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, _TAKE_CHUNK):
        chunk = flat_out[start:start + _TAKE_CHUNK]
        np.subtract(flat_in[start:start + _TAKE_CHUNK], pivot32, out=chunk, dtype=np.float32)
        chunk *= a32
        chunk += b32
        np.clip(chunk, 0.0, 1.0, out=chunk)
    return out


def _lookup(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    out = np.empty(index.shape, dtype=np.float32)
    flat_in, flat_out = index.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, _TAKE_CHUNK):
        stop = start + _TAKE_CHUNK
        np.take(table, flat_in[start:stop], out=flat_out[start:stop])
    return out


def _grey_chain(ds, values: np.ndarray) -> np.ndarray:
    """Modality LUT, VOI (LUT or window), MONOCHROME1 / Presentation LUT INVERSE inversion,
    padding to black, clipped: element-wise, with
    pydicom's float64 functions. `grey_intensity` evaluates it on every possible stored value
    once; the result for an image is this applied to each pixel."""
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    arr = values
    values = apply_modality_lut(arr, ds)
    voi = ds.get("VOILUTSequence")
    if voi and "LUTDescriptor" in voi[0] and "LUTData" in voi[0]:
        if values.dtype.kind == "f":
            values = np.rint(values).astype(np.int64)  # a LUT is indexed by integers
        out = apply_voi(values, ds, index=0).astype(np.float32)
        out /= 2 ** int(voi[0].LUTDescriptor[2]) - 1
    elif _has_window(ds):
        windowed = apply_windowing(values, ds, index=0)
        with np.errstate(over="ignore"):  # SIGMOID at +-1e30 overflows to its limits, as wanted
            lo, hi = apply_windowing(np.array([-1e30, 1e30]), ds, index=0)
        out = ((windowed - lo) / (hi - lo)).astype(np.float32)
    else:
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        stored = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed
                          else [0, 2 ** bits - 1])
        if ds.get("ModalityLUTSequence"):
            lo, hi = 0, 2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
        else:
            lo, hi = apply_modality_lut(stored, ds).astype(np.float64)
        out = ((values - lo) / (hi - lo)).astype(np.float32)
    if photometric == "MONOCHROME1" or _presentation_inverse(ds):
        out = 1 - out  # low values are white; invert only after the VOI
    padding = padding_mask(ds, arr)
    if padding is not None:
        out = np.where(padding, np.float32(0.0), out)  # not tissue: black, whatever the window
    return unit_float(out)


def _presentation_inverse(ds) -> bool:
    """PresentationLUTShape INVERSE: show the image inverted, as MONOCHROME1 is. DX files say
    both MONOCHROME1 and INVERSE for one inversion (PS3.3 C.8.11.6.1), so either inverts once."""
    return str(ds.get("PresentationLUTShape") or "").strip().upper() == "INVERSE"


def padding_mask(ds, stored: np.ndarray) -> np.ndarray | None:
    """Which stored values are padding (PS3.3 C.7.5.1.1.2): PixelPaddingValue, or the range
    from it to PixelPaddingRangeLimit; None when the file declares no padding. Padding marks
    pixels outside the imaged area, so it is mapped to the background (black) instead of going
    through the window, where e.g. -2000 or 0 in a MONOCHROME1 file would turn white."""
    value, limit = ds.get("PixelPaddingValue"), ds.get("PixelPaddingRangeLimit")
    try:
        value = int(_first_value(value)) if value is not None else None
        limit = int(_first_value(limit)) if limit is not None else None
    except (TypeError, ValueError):
        return None  # a malformed padding value is ignored, as viewers do
    if value is None:
        return None
    lo, hi = (value, value) if limit is None else (min(value, limit), max(value, limit))
    return (stored >= lo) & (stored <= hi)


def _has_window(ds) -> bool:
    """Window Center/Width present and usable. An invalid width (below 1 for LINEAR, not
    positive otherwise) is treated as absent, as viewers do, rather than making the file
    unreadable."""
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    except Exception:  # noqa: BLE001 - an unparsable value is no window
        return False
    if center is None or width is None or center == "" or width == "":
        return False
    first = _first_value(width)  # multi-valued: the first window is the primary one
    try:
        width = float(first)
        float(_first_value(center))
    except (TypeError, ValueError, IndexError, KeyError):
        return False
    linear = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() == "LINEAR"
    return width >= 1 if linear else width > 0


def _first_value(value):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__getitem__"):
        return value
    return value[0] if len(value) else None


# ---------------------------------------------------------------------------- metadata

def dicom_info(f: BinaryIO, name: str) -> dict[str, Any]:
    """format, mode (Photometric Interpretation), width, height, bit_depth, is_colour."""
    ds = read_header(f, name).ds
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    return {"format": "dicom", "mode": photometric, "width": int(ds.get("Columns", 0)),
            "height": int(ds.get("Rows", 0)),
            "bit_depth": int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0),
            "is_colour": not photometric.startswith("MONOCHROME")}
