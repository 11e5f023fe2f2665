"""fxscore.dicom: DICOM values, the lookup-table windowing, deflated data sets and their bombs.

Files are written with pydicom into tmp_path and read through `fxscore.images.read_image`, the
one entry point. The windowing is checked against the float64 chain it replaced, kept here as
`reference_grey` (pydicom's own functions on the whole image).
"""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         SecondaryCaptureImageStorage, generate_uid)

from conftest import REPO
from fxscore import dicom, images
from fxscore.images import (ImageReadError, decoded_nbytes, image_info, is_dicom_file,
                            read_image, sniff_format)

COLOURS = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]], dtype=np.uint8)
COLOURS_GREY = COLOURS @ np.array([0.299, 0.587, 0.114]) / 255
STORED = np.array([[0, 750, 1000, 1500, 4095]], np.uint16)


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                bits: int = 12, syntax=ExplicitVRLittleEndian, **elements) -> Path:
    """A DICOM Secondary Capture. pixels: (H, W), (frames, H, W) for monochrome, (H, W, 3) for
    RGB; signed dtypes set Pixel Representation 1."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PhotometricInterpretation = photometric
    if photometric == "RGB":
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.Rows, ds.Columns = pixels.shape[:2]
    else:
        ds.SamplesPerPixel = 1
        ds.Rows, ds.Columns = pixels.shape[-2:]
        if pixels.ndim == 3:
            ds.NumberOfFrames = pixels.shape[0]
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def check_image(img: np.ndarray) -> None:
    assert img.dtype == np.float32 and img.ndim == 2 and img.flags.c_contiguous
    assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0


def lut_item(entries: int, first: int, bits: int, data) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [entries % 65536, first, bits])  # LUT Descriptor
    item.add_new(0x00283006, "US", [int(v) for v in data])  # LUT Data
    return item


# ---------------------------------------------------------------------------- values

@pytest.mark.parametrize("pixels, elements, expected", [
    (STORED, {}, STORED / 4095),  # no window: Bits Stored (12) is the range, 4095 -> 1.0
    (STORED, {"PhotometricInterpretation": "MONOCHROME1"}, 1 - STORED / 4095),
    (np.array([[0, 512, 1023]], np.uint16), {"BitsStored": 10},
     np.array([[0, 512 / 1023, 1]])),
    # Window in stored units: LINEAR, c - 0.5 = 1000, w - 1 = 1000.
    (STORED, {"WindowCenter": 1000.5, "WindowWidth": 1001},
     np.array([[0, 0.25, 0.5, 1, 1]])),
    # MONOCHROME1 inverted AFTER windowing (inverting first would give 0 for stored 750).
    (STORED, {"PhotometricInterpretation": "MONOCHROME1", "WindowCenter": 1000.5,
              "WindowWidth": 1001}, np.array([[1, 0.75, 0.5, 0, 0]])),
    # Rescale applies before the window: stored 750 -> 2 * 750 - 1000 = 500.
    (STORED, {"RescaleSlope": 2, "RescaleIntercept": -1000, "WindowCenter": 1000.5,
              "WindowWidth": 2001}, np.array([[0, 0.25, 0.5, 1, 1]])),
    # Rescale without a window: the rescaled Bits Stored range is black..white.
    (STORED, {"RescaleSlope": 2, "RescaleIntercept": -1000}, STORED / 4095),
    # Several windows: the first is the primary one.
    (STORED, {"WindowCenter": [1000.5, 3], "WindowWidth": [1001, 2]},
     np.array([[0, 0.25, 0.5, 1, 1]])),
    # A width below 1 is invalid for LINEAR: treated as absent, as viewers do.
    (STORED, {"WindowCenter": 1000, "WindowWidth": 0.5}, STORED / 4095),
    # Signed 16-bit without a window: -32768..32767 is black..white.
    (np.array([[-32768, 0, 32767]], np.int16), {"BitsStored": 16, "HighBit": 15},
     np.array([[0, 32768 / 65535, 1]])),
    # Multi-frame: the first frame.
    (np.stack([STORED, 4095 - STORED]), {}, STORED / 4095),
], ids=["mono2-12bit", "mono1", "10bit", "window", "mono1-after-window",
        "rescale-then-window", "rescale-no-window", "first-of-windows", "bad-width-ignored",
        "signed16", "multiframe"])
def test_dicom_values(tmp_path, pixels, elements, expected):
    photometric = elements.pop("PhotometricInterpretation", "MONOCHROME2")
    bits = elements.pop("BitsStored", 16 if pixels.dtype.kind == "i" else 12)
    path = write_dicom(tmp_path / "x.dcm", pixels, photometric, bits, **elements)
    img = read_image(path)
    check_image(img)
    np.testing.assert_allclose(img, expected, atol=1e-6)


def test_dicom_voi_lut_sequence(tmp_path):
    # 4 entries, the first maps stored value 0, 16-bit output.
    path = write_dicom(tmp_path / "lut.dcm", np.array([[0, 1, 2, 3, 9]], np.uint16),
                       VOILUTSequence=[lut_item(4, 0, 16, [0, 1000, 30000, 65535])],
                       WindowCenter=100, WindowWidth=10)
    np.testing.assert_allclose(read_image(path),
                               [[0, 1000 / 65535, 30000 / 65535, 1, 1]], atol=1e-6)


def test_dicom_rgb_becomes_luma(tmp_path):
    path = write_dicom(tmp_path / "rgb.dcm", COLOURS, photometric="RGB", bits=8)
    np.testing.assert_allclose(read_image(path), COLOURS_GREY, atol=1e-6)
    assert image_info(path)["is_colour"] is True


def test_dicom_found_by_content_without_suffix_or_preamble(tmp_path):
    no_suffix = write_dicom(tmp_path / "IM0001", STORED)
    assert is_dicom_file(no_suffix) and sniff_format(no_suffix) == "dicom"
    np.testing.assert_allclose(read_image(no_suffix), STORED / 4095, atol=1e-6)

    # Pre-Part-10 file: no 128-byte preamble, no 'DICM', no file meta. Only the suffix says so.
    ds = pydicom.dcmread(no_suffix)
    del ds.file_meta
    ds.preamble = None
    raw = tmp_path / "old.dcm"
    pydicom.dcmwrite(raw, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert not is_dicom_file(raw)
    np.testing.assert_allclose(read_image(raw), STORED / 4095, atol=1e-6)
    # ...and from memory, where the suffix comes from the name given.
    np.testing.assert_allclose(read_image(io.BytesIO(raw.read_bytes()), name="x/old.dcm"),
                               STORED / 4095, atol=1e-6)


def test_dicom_header_info(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", np.zeros((30, 20), np.uint16),
                       photometric="MONOCHROME1")
    assert image_info(path) == {"format": "dicom", "mode": "MONOCHROME1", "width": 20,
                                "height": 30, "bit_depth": 12, "is_colour": False}


def test_odd_encapsulation_read_through_the_whole_data_set():
    """pydicom's frame-only reader rejects this file's basic offset table; its data set
    reader does not, and neither does read_image."""
    from pydicom.data import get_testdata_file
    path = get_testdata_file("SC_rgb_jpeg.dcm")
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255
    np.testing.assert_allclose(read_image(path), expected, atol=1e-5)


# ---------------------------------------------------------------------------- native frames

_DIRTY = np.array([[0, 1, 4095, 4096], [0xF123, 0x8000, 0x0FFF, 0xFFFF]], dtype=np.uint16)


@pytest.mark.parametrize("pixels, bits, syntax", [
    (_DIRTY & 0x0FFF, 12, ExplicitVRLittleEndian),  # clean 12-bit: the view itself
    (_DIRTY, 12, ExplicitVRLittleEndian),  # high bits set: masked as pydicom masks them
    (_DIRTY, 16, ImplicitVRLittleEndian),
    (_DIRTY.view(np.int16), 12, ExplicitVRLittleEndian),  # signed: sign-extended from bit 11
    (np.array([[-2048, 2047], [-1, 0]], np.int16), 12, ImplicitVRLittleEndian),
    (np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 11, 6, ExplicitVRLittleEndian),  # frames
])
def test_native_frame_is_pydicoms_without_the_copy(tmp_path, pixels, bits, syntax):
    """Native little-endian greyscale is read as a view of the bytes (no copy), and equals
    pydicom's pixel_array exactly, dtype included: from memory and from an open file."""
    path = write_dicom(tmp_path / "a.dcm", pixels, bits=bits, syntax=syntax)
    expected = pydicom.pixels.pixel_array(path, index=0)
    data = path.read_bytes()
    for source in (io.BytesIO(data), open(path, "rb")):
        with source:
            header = dicom.read_header(source, "a.dcm")
            arr = dicom._native_frame(source, header)
        assert arr is not None
        assert arr.dtype == expected.dtype and np.array_equal(arr, expected)
    with io.BytesIO(data) as f:
        arr = dicom._native_frame(f, dicom.read_header(f, "a.dcm"))
    stored = pixels.reshape(-1, *pixels.shape[-2:])[0]
    # a view of `data` unless some pixel's unused bits had to be cleared
    assert np.shares_memory(arr, np.frombuffer(data, np.uint8)) == np.array_equal(arr, stored)


@pytest.mark.parametrize("case", ["big endian", "rgb", "32 bit", "short", "palette"])
def test_native_frame_leaves_other_layouts_to_pydicom(tmp_path, case):
    grey = np.arange(12, dtype=np.uint16).reshape(3, 4)
    path = {
        "big endian": lambda p: write_dicom(p, grey, syntax=ExplicitVRBigEndian),
        "rgb": lambda p: write_dicom(p, np.zeros((3, 4, 3), np.uint8), "RGB", bits=8),
        "32 bit": lambda p: write_dicom(p, grey.astype(np.uint32), bits=32),
        "short": lambda p: _short_pixels(write_dicom(p, grey)),
        "palette": lambda p: write_dicom(p, grey, "PALETTE COLOR"),
    }[case](tmp_path / "a.dcm")
    with open(path, "rb") as f:
        assert dicom._native_frame(f, dicom.read_header(f, "a.dcm")) is None


def _short_pixels(path: Path) -> Path:
    """The pixel element's length says fewer bytes than Rows x Columns need."""
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:-2]
    ds.save_as(path)
    return path


# ---------------------------------------------------------------------------- lookup table

def reference_grey(ds, arr: np.ndarray) -> np.ndarray:
    """The float64 chain fxscore used before the lookup table (verbatim, whole image)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    values = apply_modality_lut(arr, ds)
    voi = ds.get("VOILUTSequence")
    if voi and "LUTDescriptor" in voi[0] and "LUTData" in voi[0]:
        if values.dtype.kind == "f":
            values = np.rint(values).astype(np.int64)
        out = apply_voi(values, ds, index=0).astype(np.float32)
        out /= 2 ** int(voi[0].LUTDescriptor[2]) - 1
    elif dicom._has_window(ds):
        windowed = apply_windowing(values, ds, index=0)
        with np.errstate(over="ignore"):
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
    if photometric == "MONOCHROME1":
        out = 1 - out
    out = np.nan_to_num(out.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(out, 0.0, 1.0)


RNG = np.random.default_rng(7)
U12 = RNG.integers(0, 4096, (97, 131)).astype(np.uint16)
U16 = RNG.integers(0, 65536, (97, 131)).astype(np.uint16)
S12 = RNG.integers(-2048, 2048, (97, 131)).astype(np.int16)
S16 = RNG.integers(-32768, 32768, (97, 131)).astype(np.int16)
U8 = RNG.integers(0, 256, (97, 131)).astype(np.uint8)
RAMP_LUT = np.sort(RNG.integers(0, 65536, 4096))
WINDOW = {"WindowCenter": 1500.5, "WindowWidth": 2001}
TABLE_CASES = {
    "12bit-no-window": (U12, 12, "MONOCHROME2", {}),
    "window-linear": (U12, 12, "MONOCHROME2", WINDOW),
    "window-linear-exact": (U12, 12, "MONOCHROME2", {**WINDOW, "VOILUTFunction": "LINEAR_EXACT"}),
    "window-sigmoid": (U12, 12, "MONOCHROME2", {**WINDOW, "VOILUTFunction": "SIGMOID"}),
    "rescale-window": (U12, 12, "MONOCHROME2", {"RescaleSlope": 0.37, "RescaleIntercept": -1024.25,
                                                "WindowCenter": -300, "WindowWidth": 900}),
    "rescale-only": (U12, 12, "MONOCHROME2", {"RescaleSlope": 2, "RescaleIntercept": -1000}),
    "mono1-window": (U12, 12, "MONOCHROME1", WINDOW),
    "mono1-no-window": (U12, 12, "MONOCHROME1", {}),
    "voi-lut": (U12, 12, "MONOCHROME2", {"VOILUTSequence": [lut_item(4096, 0, 16, RAMP_LUT)]}),
    "mono1-voi-lut": (U12, 12, "MONOCHROME1",
                      {"VOILUTSequence": [lut_item(4096, 0, 16, RAMP_LUT)]}),
    "float-rescale-then-voi-lut": (U12, 12, "MONOCHROME2", {
        "RescaleSlope": 0.5, "RescaleIntercept": 3.25,
        "VOILUTSequence": [lut_item(4096, 0, 16, RAMP_LUT)]}),
    "modality-lut-sequence": (U12, 12, "MONOCHROME2", {
        "ModalityLUTSequence": [lut_item(4096, 0, 16, RAMP_LUT[::-1])]}),
    "signed12-ct-window": (S12, 12, "MONOCHROME2", {"RescaleSlope": 1, "RescaleIntercept": -1024,
                                                    "WindowCenter": 40, "WindowWidth": 400}),
    "signed16-no-window": (S16, 16, "MONOCHROME2", {}),
    "signed16-mono1-window": (S16, 16, "MONOCHROME1", {"WindowCenter": -100, "WindowWidth": 30001}),
    "16bit-full-window": (U16, 16, "MONOCHROME2", {"WindowCenter": 30000, "WindowWidth": 20000}),
    "8bit-window": (U8, 8, "MONOCHROME2", {"WindowCenter": 100, "WindowWidth": 50}),
    "32bit-container": (U12.astype(np.uint32), 16, "MONOCHROME2", WINDOW),
    "32bit-wide-values": ((U16.astype(np.uint32) << 12), 32, "MONOCHROME2", {}),
}


@pytest.mark.parametrize("case", sorted(TABLE_CASES))
def test_lookup_table_matches_float64_chain(tmp_path, case):
    pixels, bits, photometric, elements = TABLE_CASES[case]
    path = write_dicom(tmp_path / "x.dcm", pixels, photometric, bits, **elements)
    ds = pydicom.dcmread(path)
    expected = reference_grey(ds, ds.pixel_array)
    got = read_image(path)
    check_image(got)
    assert got.shape == pixels.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert len(np.unique(expected)) > 20  # the case exercises a real range of values


def test_straight_line_shortcut_taken_for_plain_windows(tmp_path, monkeypatch):
    pixels, bits, photometric, elements = TABLE_CASES["rescale-window"]
    path = write_dicom(tmp_path / "x.dcm", pixels, "MONOCHROME1", bits, **elements)
    ds = pydicom.dcmread(path)
    monkeypatch.setattr(dicom, "_lookup", lambda *a: pytest.fail("indexed the table"))
    np.testing.assert_allclose(read_image(path), reference_grey(ds, ds.pixel_array),
                               rtol=0, atol=1e-6)


def test_wrong_straight_line_falls_back_to_the_table(tmp_path, monkeypatch):
    """The line is only a proposal: checked on every stored value before it is used."""
    pixels, bits, photometric, elements = TABLE_CASES["window-linear"]
    path = write_dicom(tmp_path / "x.dcm", pixels, photometric, bits, **elements)
    ds = pydicom.dcmread(path)
    exact = dicom._linear_form(ds)
    monkeypatch.setattr(dicom, "_linear_form", lambda ds: (exact[0] * 1.001, exact[1]))
    np.testing.assert_allclose(read_image(path), reference_grey(ds, ds.pixel_array),
                               rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- sizes and bombs

def test_decoded_size_checked_from_the_header(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "x.dcm", np.zeros((3, 30, 40), np.uint16))
    # 30 x 40 x 1 sample x 3 frames x 2 bytes = 7200 bytes decoded.
    monkeypatch.setattr(images, "MAX_DECODED_BYTES", 7199)
    with pytest.raises(ImageReadError, match=r"decompression bomb.*40 x 30 pixels x 1 samples "
                                             r"x 3 frames x 16 bits.*FXSCORE_MAX_DECODED_BYTES"):
        read_image(path)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        decoded_nbytes(path)
    monkeypatch.setattr(images, "MAX_DECODED_BYTES", 7200)
    check_image(read_image(path))
    assert decoded_nbytes(path) >= 7200 + 30 * 40 * 4


def test_uncompressed_file_claiming_more_frames_is_refused_unread(tmp_path):
    """The header decides: a 64 x 64 image whose header claims 8000 x 8000 x 40 frames."""
    path = write_dicom(tmp_path / "x.dcm", np.zeros((64, 64), np.uint16))
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 8000
    ds.NumberOfFrames = 40
    ds.save_as(path)
    with pytest.raises(ImageReadError, match="decompression bomb.*40 frames"):
        read_image(path)


def test_pillow_pixel_guard_also_applies(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "x.dcm", np.zeros((30, 30), np.uint16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 900 pixels > 2 x 100
    with pytest.raises(ImageReadError, match="decompression bomb.*MAX_IMAGE_PIXELS"):
        read_image(path)


def _deflated_file(path: Path, ds: Dataset, pixel_length: int, zero_bytes: int) -> Path:
    """A deflated DICOM whose pixel element declares pixel_length bytes and holds zero_bytes
    zeros, written without ever holding them: compressed zero blocks, each ended by a full
    flush, are identical byte for byte, so one block is compressed once and repeated."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    header = body.getvalue() + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_length)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflate.compress(header) + deflate.flush(zlib.Z_FULL_FLUSH)]
    block = 1 << 24
    zeros = deflate.compress(bytes(block)) + deflate.flush(zlib.Z_FULL_FLUSH)
    count, rest = divmod(zero_bytes, block)
    parts += [zeros] * count
    parts.append(deflate.compress(bytes(rest)) + deflate.flush())
    file_meta = DicomBytesIO()
    file_meta.is_little_endian, file_meta.is_implicit_VR = True, False
    write_file_meta_info(file_meta, meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + file_meta.getvalue() + b"".join(parts))
    return path


def _bomb_dataset() -> Dataset:
    ds = Dataset()
    ds.Modality = "DX"
    ds.Rows = ds.Columns = 9000
    ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation = 3, 0, "RGB"
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit, ds.PixelRepresentation, ds.NumberOfFrames = 31, 0, 4
    return ds


BOMB_BYTES = 9000 * 9000 * 3 * 4 * 4  # 3.9 GB

PEAK_SCRIPT = """
import json, resource, sys
from fxscore import dicom
from fxscore.images import ImageReadError, decoded_nbytes, image_info, read_image
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
inflated = 0
more = dicom._Inflater._more
def counted(self, max_out):  # every inflated byte passes here: header and pixel element
    global inflated
    out = more(self, max_out)
    inflated += len(out)
    return out
dicom._Inflater._more = counted
out = {}
try:
    read_image(sys.argv[1])
    out["read"] = "decoded"
except ImageReadError as e:
    out["read"] = str(e)
try:
    out["nbytes"] = decoded_nbytes(sys.argv[1])
except ImageReadError as e:
    out["nbytes"] = str(e)
out["info"] = image_info(sys.argv[1])
out["inflated"] = inflated
out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["base_mb"] = base / 1024
print(json.dumps(out))
"""


def run_measured(path: Path, address_space: int = 3 << 30) -> dict:
    """Read a file in a fresh process under an address-space cap: what happened, how many bytes
    were inflated and the peak RSS (a bomb inflated whole would hit the cap, not the machine)."""
    proc = subprocess.run(["timeout", "120", "prlimit", f"--as={address_space}", sys.executable,
                           "-c", PEAK_SCRIPT, str(path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
def test_deflated_bomb_refused_before_inflating(tmp_path):
    """3.8 MB that inflate to 3.9 GB (9000 x 9000 x 3 x 32 bits x 4 frames): refused from its
    header, inflating only the header, with the memory of reading a header (pydicom would inflate
    it whole: ~4 GB, 30 s)."""
    path = _deflated_file(tmp_path / "bomb.dcm", _bomb_dataset(), BOMB_BYTES, BOMB_BYTES)
    assert path.stat().st_size < 4_000_000
    result = run_measured(path)
    assert "decompression bomb" in result["read"] and "4 frames x 32 bits" in result["read"]
    assert "decompression bomb" in str(result["nbytes"])
    assert result["info"]["width"] == 9000 and result["info"]["format"] == "dicom"
    # Three reads of the file (read_image, decoded_nbytes, image_info), each inflating at most
    # one 1 MiB chunk for the header: never the 3.9 GB of pixels.
    assert result["inflated"] <= 3 << 20, result
    assert result["peak_mb"] - result["base_mb"] < 100, result
    assert result["peak_mb"] < 400, result


@pytest.mark.slow
def test_deflated_padding_beyond_the_image_is_never_inflated(tmp_path):
    """A 100 x 100 image whose pixel element runs on for 2 GiB of zeros: the image reads, and
    only its 20,000 bytes are inflated."""
    ds = _bomb_dataset()
    ds.Rows = ds.Columns = 100
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    del ds.PlanarConfiguration, ds.NumberOfFrames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    path = _deflated_file(tmp_path / "padded.dcm", ds, 2 << 30, 2 << 30)
    result = run_measured(path)
    assert result["read"] == "decoded", result
    assert result["inflated"] <= 3 << 20, result  # three header chunks, never the 2 GiB
    assert result["peak_mb"] - result["base_mb"] < 100, result


def test_deflated_limit_counts_inflated_bytes(tmp_path, monkeypatch):
    pixels = np.arange(60 * 50, dtype=np.uint16).reshape(60, 50) % 4096
    path = write_dicom(tmp_path / "d.dcm", pixels, syntax=DeflatedExplicitVRLittleEndian)
    monkeypatch.setattr(images, "MAX_DECODED_BYTES", 1000)  # less than the header inflates to?
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(path)


def test_deflated_reads_like_its_uncompressed_twin(tmp_path):
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 4096, (3, 70, 90)).astype(np.uint16)
    extra = {"WindowCenter": 2000, "WindowWidth": 3000, "PatientName": "Test^Deflated"}
    plain = write_dicom(tmp_path / "plain.dcm", frames, **extra)
    packed = write_dicom(tmp_path / "packed.dcm", frames, syntax=DeflatedExplicitVRLittleEndian,
                         **extra)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert packed.read_bytes()[:2000].count(b"Test^Deflated") == 0  # really deflated
    header = dicom.read_header(open(packed, "rb"), "packed.dcm")
    assert header.inflater is not None and header.has_pixels
    np.testing.assert_array_equal(read_image(packed), read_image(plain))
    assert image_info(packed) == image_info(plain)
    # Odd-length image (padded to even), and a trailing element after the pixel data.
    odd = rng.integers(0, 256, (7, 9)).astype(np.uint8)
    twin = write_dicom(tmp_path / "odd.dcm", odd, bits=8, syntax=DeflatedExplicitVRLittleEndian)
    ds = pydicom.dcmread(twin)
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 64)  # Data Set Trailing Padding
    ds.save_as(twin)
    np.testing.assert_allclose(read_image(twin), odd / 255, atol=1e-6)


def test_deflated_truncated_is_an_error(tmp_path):
    pixels = np.random.default_rng(4).integers(0, 4096, (80, 80)).astype(np.uint16)
    path = write_dicom(tmp_path / "d.dcm", pixels, syntax=DeflatedExplicitVRLittleEndian)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(path)


# ---------------------------------------------------------------------------- messages

SECRET = b"SECRET^PATIENT^X"


def _with_raw_value(path: Path, marker: bytes) -> Path:
    """Replace a value written by pydicom with SECRET bytes of the same length, as a corrupt
    file would hold them (pydicom refuses to write such values itself)."""
    data = path.read_bytes()
    assert data.count(marker) >= 1  # a SOP class UID is also in the file meta
    path.write_bytes(data.replace(marker, SECRET[:len(marker)]))
    return path


@pytest.mark.parametrize("element, value", [
    ("NumberOfFrames", "98765432"),  # pydicom's int() error quotes the value
    ("RescaleSlope", "9.87654321012345"),
    ("RescaleIntercept", "9.87654321012345"),
    ("WindowCenter", "9.87654321012345"),
    ("PhotometricInterpretation", "MONOCHROME987654"),
    ("SOPClassUID", "1.2.3.987654321"),
])
def test_corrupt_elements_never_reach_the_message(tmp_path, element, value):
    path = write_dicom(tmp_path / "x.dcm", STORED, **{element: value})
    if element == "SOPClassUID":  # a file without pixels names its SOP class if registered
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path)
    _with_raw_value(path, value.encode())
    try:
        read_image(path)
    except ImageReadError as e:
        message = str(e)
        assert "SECRET" not in message and "PATIENT" not in message, message
        assert "\n" not in message and str(path) in message
    try:
        image_info(path)
    except ImageReadError as e:
        assert "SECRET" not in str(e)


def test_unregistered_transfer_syntax_not_quoted(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", STORED)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.3.987654321"
    ds.save_as(path)
    _with_raw_value(path, b"1.2.3.987654321")
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "SECRET" not in str(err.value)


def test_no_pixel_data_names_registered_sop_class(tmp_path):
    path = write_dicom(tmp_path / "sr.dcm", STORED)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(ImageReadError, match=r"no pixel data \(Secondary Capture Image Storage\)"):
        read_image(path)
