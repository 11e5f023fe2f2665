"""fxscore.images: every format, mode and oddity of the files a hospital has, on real files.

Cases are written to tmp_path with Pillow and pydicom and checked value by value; the
sample_data phantoms and the real X-rays (realdata) are read in full.
"""
from __future__ import annotations

import csv
import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from PIL.PngImagePlugin import PngInfo
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (ExplicitVRLittleEndian, JPEGLossless, SecondaryCaptureImageStorage,
                         generate_uid)

from conftest import REPO, SAMPLE_DATA, require_real_data
from fxscore.images import (IMAGE_EXTENSIONS, ImageReadError, image_info, is_dicom_file,
                            read_image, sniff_format)

LUMA = np.array([0.299, 0.587, 0.114])


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                bits: int = 12, **elements) -> Path:
    """A DICOM Secondary Capture, Explicit VR Little Endian. pixels: (H, W), (frames, H, W)
    for monochrome, (H, W, 3) for RGB; signed dtypes set Pixel Representation 1."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
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


def png_bytes(pixels: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", **save)
    return buf.getvalue()


def ramp(h: int = 24, w: int = 32) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) * 7 % 256).astype(np.uint8)


def check_image(img: np.ndarray) -> None:
    assert img.dtype == np.float32 and img.ndim == 2 and img.flags.c_contiguous
    assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0


# ---------------------------------------------------------------------------- Pillow modes

def test_8bit_grey_is_exact(tmp_path):
    path = tmp_path / "grey.png"
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path.write_bytes(png_bytes(pixels))
    img = read_image(path)
    check_image(img)
    np.testing.assert_array_equal(img, pixels.astype(np.float32) / 255)
    assert img[-1, -1] == 1.0


COLOURS = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]], dtype=np.uint8)
COLOURS_GREY = COLOURS @ LUMA / 255


def _mode_cases():
    """(id, PIL image, format, expected intensity)."""
    rgb = Image.fromarray(COLOURS)
    rgba = np.dstack([COLOURS, np.array([[0, 255, 7, 128]], np.uint8)])
    grey = np.array([[0, 64, 255]], np.uint8)
    yield "L", Image.fromarray(grey), "PNG", grey / 255
    yield "LA", Image.fromarray(np.dstack([grey, [[0, 9, 255]]]).astype(np.uint8), "LA"), \
        "PNG", grey / 255
    yield "RGB", rgb, "PNG", COLOURS_GREY
    # Alpha is dropped: a fully transparent red pixel still reads as red's luma.
    yield "RGBA", Image.fromarray(rgba, "RGBA"), "PNG", COLOURS_GREY
    pal = rgb.quantize(colors=4, method=Image.Quantize.MAXCOVERAGE)
    yield "P", pal, "PNG", np.asarray(pal.convert("RGB")) @ LUMA / 255
    # CMYK (0,0,0,0) is white, K=255 black, pure cyan is RGB (0,255,255).
    cmyk = Image.frombytes("CMYK", (3, 1), bytes([0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0, 0]))
    yield "CMYK", cmyk, "TIFF", np.array([[1.0, 0.0, (0.587 + 0.114)]])
    yield "1", Image.fromarray(np.array([[0, 1, 1]], bool)), "PNG", np.array([[0.0, 1.0, 1.0]])
    i16 = np.array([[0, 32768, 65535]], np.uint16)
    yield "I;16", Image.fromarray(i16), "PNG", i16 / 65535
    big = Image.new("I;16B", (3, 1))
    big.frombytes(i16.astype(">u2").tobytes())
    yield "I;16B", big, "TIFF", i16 / 65535
    # 32-bit integers: a 16-bit range inside is taken as 16-bit, anything else min..max.
    yield "I-16bit-range", Image.fromarray(np.array([[0, 1000, 65535]], np.int32), "I"), \
        "TIFF", np.array([[0, 1000, 65535]]) / 65535
    yield "I-signed", Image.fromarray(np.array([[-100, 0, 100]], np.int32), "I"), \
        "TIFF", np.array([[0.0, 0.5, 1.0]])
    yield "F-unit", Image.fromarray(np.array([[0, 0.25, 1]], np.float32), "F"), "TIFF", \
        np.array([[0, 0.25, 1]])
    yield "F-wide", Image.fromarray(np.array([[-1, 1, 3]], np.float32), "F"), "TIFF", \
        np.array([[0, 0.5, 1]])
    yield "YCbCr", rgb.convert("YCbCr"), "TIFF", np.asarray(rgb.convert("YCbCr").convert(
        "RGB")) @ LUMA / 255
    yield "BMP", rgb, "BMP", COLOURS_GREY
    yield "WEBP-lossless", rgb, "WEBP", COLOURS_GREY


@pytest.mark.parametrize("image, fmt, expected", [c[1:] for c in _mode_cases()],
                         ids=[c[0] for c in _mode_cases()])
def test_every_mode_becomes_grey_float(tmp_path, image, fmt, expected):
    path = tmp_path / f"x.{fmt.lower()}"
    image.save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert Image.open(path).mode == image.mode or fmt in ("WEBP", "BMP")
    img = read_image(path)
    check_image(img)
    np.testing.assert_allclose(img, expected, atol=2e-6)


# ---------------------------------------------------------------------------- 16-bit depth

DATA12 = np.array([[0, 2048, 4095]], np.uint16)


def _png16(path, pixels, sbit=None):
    info = PngInfo()
    if sbit:
        info.add(b"sBIT", bytes([sbit]))
    Image.fromarray(pixels).save(path, pnginfo=info)


@pytest.mark.parametrize("write, expected_max", [
    (lambda p: _png16(p.with_suffix(".png"), DATA12, 12), 1.0),        # sBIT says 12 bits
    (lambda p: _png16(p.with_suffix(".png"), DATA12), 4095 / 65535),    # no depth stated
    (lambda p: _png16(p.with_suffix(".png"), DATA12, 8), 4095 / 65535),  # sBIT lies: ignored
    (lambda p: Image.fromarray(DATA12).save(p.with_suffix(".tif"), tiffinfo={281: 4095}), 1.0),
    (lambda p: Image.fromarray(DATA12).save(p.with_suffix(".tif")), 4095 / 65535),
], ids=["png-sbit12", "png-no-sbit", "png-sbit-too-small", "tiff-maxsample", "tiff-plain"])
def test_16bit_scaled_by_real_depth(tmp_path, write, expected_max):
    write(tmp_path / "x")
    path = next(tmp_path.iterdir())
    img = read_image(path)
    check_image(img)
    assert img[0, 2] == pytest.approx(expected_max, abs=1e-7)
    assert img[0, 1] == pytest.approx(2048 / 4095 * expected_max, abs=1e-6)
    if expected_max == 1.0:
        assert image_info(path)["bit_depth"] == 12


# ---------------------------------------------------------------------------- DICOM

STORED = np.array([[0, 750, 1000, 1500, 4095]], np.uint16)


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
    item = Dataset()
    # 4 entries, the first maps stored value 0, 16-bit output. (Both tags have ambiguous VRs.)
    item.add_new(0x00283002, "US", [4, 0, 16])  # LUT Descriptor
    item.add_new(0x00283006, "US", [0, 1000, 30000, 65535])  # LUT Data
    path = write_dicom(tmp_path / "lut.dcm", np.array([[0, 1, 2, 3, 9]], np.uint16),
                       VOILUTSequence=[item], WindowCenter=100, WindowWidth=10)
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
    import pydicom
    ds = pydicom.dcmread(no_suffix)
    del ds.file_meta
    ds.preamble = None
    raw = tmp_path / "old.dcm"
    pydicom.dcmwrite(raw, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert not is_dicom_file(raw)
    np.testing.assert_allclose(read_image(raw), STORED / 4095, atol=1e-6)


def test_dicom_header_info(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", np.zeros((30, 20), np.uint16),
                       photometric="MONOCHROME1")
    assert image_info(path) == {"format": "dicom", "mode": "MONOCHROME1", "width": 20,
                                "height": 30, "bit_depth": 12, "is_colour": False}


# ---------------------------------------------------------------------------- orientation, GIF

EXIF_EXPECTED = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1],
                 4: lambda a: a[::-1], 5: lambda a: a.T, 6: lambda a: np.rot90(a, -1),
                 7: lambda a: a[::-1, ::-1].T, 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", sorted(EXIF_EXPECTED))
def test_exif_orientation_applied(tmp_path, orientation):
    stored = ramp(24, 32)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "x.png"  # lossless, so the pixels can be compared exactly
    image.save(path, exif=exif.tobytes())
    img = read_image(path)
    np.testing.assert_array_equal(img, EXIF_EXPECTED[orientation](stored) / np.float32(255))
    info = image_info(path)
    assert (info["height"], info["width"]) == img.shape


def test_exif_rotated_jpeg_changes_shape(tmp_path):
    stored = np.zeros((20, 40), np.uint8)
    stored[:, :8] = 255  # bright band on the left of the stored image
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # view rotated 90 degrees clockwise: the band goes to the top
    image.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    img = read_image(tmp_path / "r.jpg")
    assert img.shape == (40, 20)
    assert img[:6].mean() > 0.95 and img[10:].mean() < 0.05


def test_gif_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 200, 90)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert Image.open(tmp_path / "a.gif").n_frames == 3
    np.testing.assert_allclose(read_image(tmp_path / "a.gif"), 10 / 255, atol=1e-7)


# ---------------------------------------------------------------------------- content, not name

def _jpeg(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=100)
    return buf.getvalue()


@pytest.mark.parametrize("name, make, fmt", [
    ("png_inside.jpg", lambda: png_bytes(ramp()), "png"),
    ("jpeg_inside.png", lambda: _jpeg(ramp()), "jpeg"),
    ("gif_inside.jpg", lambda: _save(ramp(), "GIF"), "gif"),
    ("tiff_inside.gif", lambda: _save(ramp(), "TIFF"), "tiff"),
    ("bmp_inside.dcm", lambda: _save(ramp(), "BMP"), "bmp"),
    ("webp_inside.tif", lambda: _save(ramp(), "WEBP", lossless=True), "webp"),
    ("no_suffix", lambda: png_bytes(ramp()), "png"),
])
def test_format_from_content_not_name(tmp_path, name, make, fmt):
    path = tmp_path / name
    path.write_bytes(make())
    assert sniff_format(path) == fmt
    assert image_info(path)["format"] == fmt
    img = read_image(path)
    tolerance = 3 / 255 if fmt == "jpeg" else 1e-6
    np.testing.assert_allclose(img, ramp() / 255, atol=tolerance)


def _save(pixels, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_discovery_helpers(tmp_path):
    assert {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".dcm", ".dicom",
            ".webp"} <= IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "export.1").write_bytes(png_bytes(ramp()))  # image content, odd suffix
    assert sniff_format(tmp_path / "export.1") == "png"
    assert sniff_format(tmp_path / "notes.txt") is None
    assert sniff_format(tmp_path / "missing.png") is None
    assert not is_dicom_file(tmp_path / "export.1")


def test_image_info_reads_header_only(tmp_path):
    path = tmp_path / "cut.png"
    whole = png_bytes(np.random.default_rng(0).integers(0, 255, (300, 200), dtype=np.uint8))
    path.write_bytes(whole[: len(whole) // 2])
    assert image_info(path) == {"format": "png", "mode": "L", "width": 200, "height": 300,
                                "bit_depth": 8, "is_colour": False}
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(path)


def test_image_info_colour(tmp_path):
    grey_rgb = np.repeat(ramp(64, 64)[..., None], 3, axis=2)
    Image.fromarray(grey_rgb).save(tmp_path / "grey.jpg", quality=90)
    arrow = grey_rgb.copy()
    arrow[20:30, 10:40] = (255, 0, 0)
    Image.fromarray(arrow).save(tmp_path / "arrow.jpg", quality=90)
    grey, red = image_info(tmp_path / "grey.jpg", decode=True), image_info(
        tmp_path / "arrow.jpg", decode=True)
    assert grey["is_colour"] and red["is_colour"]  # both stored as RGB
    assert not grey["has_colour"] and red["has_colour"]
    Image.fromarray(ramp()).convert("P").save(tmp_path / "grey_palette.png")
    assert image_info(tmp_path / "grey_palette.png")["is_colour"] is False


# ---------------------------------------------------------------------------- broken inputs

def _png_claiming(width, height) -> bytes:
    """A PNG header claiming a huge image, no pixel data: what a decompression bomb starts as."""
    def chunk(kind, data):
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _dicom_unsupported_syntax(path):
    write_dicom(path, STORED)
    import pydicom
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(32)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)


def _dicom_without_pixels(path):
    write_dicom(path, STORED)
    import pydicom
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)


def _cut(data: bytes, keep: float) -> bytes:
    return data[: int(len(data) * keep)]


BROKEN = {
    "truncated-png": ("a.png", lambda p: p.write_bytes(_cut(png_bytes(ramp(64, 64)), 0.6)),
                      "truncated"),
    "truncated-jpeg": ("a.jpg", lambda p: p.write_bytes(_cut(_jpeg(ramp(64, 64)), 0.6)),
                       "truncated"),
    "empty": ("a.jpg", lambda p: p.write_bytes(b""), "empty"),
    "text-as-png": ("a.png", lambda p: p.write_text("not a picture\n"), "not an image"),
    "eps-never-run": ("a.jpg", lambda p: p.write_text("%!PS-Adobe-3.0 EPSF-3.0\n"),
                      "not an image"),
    "text-as-dcm": ("a.dcm", lambda p: p.write_text("not a dicom\n" * 20), "DICOM"),
    "missing": ("missing.png", lambda p: None, "no such file"),
    "directory": ("folder.png", lambda p: p.mkdir(), "directory"),
    "bomb-header": ("bomb.png", lambda p: p.write_bytes(_png_claiming(100_000, 100_000)),
                    "decompression bomb"),
    "dicom-no-pixels": ("sr.dcm", _dicom_without_pixels, "no pixel data"),
    "dicom-truncated": ("cut.dcm", lambda p: p.write_bytes(_cut(
        write_dicom(p, np.zeros((64, 64), np.uint16)).read_bytes(), 0.7)), "pixel data"),
    "dicom-jpeg-lossless": ("j.dcm", _dicom_unsupported_syntax, "pip install.*pylibjpeg"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_inputs_raise_clear_error(tmp_path, case):
    name, make, reason = BROKEN[case]
    if case == "dicom-jpeg-lossless":
        from pydicom.pixels import get_decoder
        if get_decoder(JPEGLossless).is_available:
            pytest.skip("a JPEG Lossless decoder plugin is installed here")
    path = tmp_path / name
    make(path)
    with pytest.raises(ImageReadError, match=reason) as err:
        read_image(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("make", [
    lambda p: p.with_suffix(".png").write_bytes(png_bytes(ramp(30, 30))),
    lambda p: write_dicom(p.with_suffix(".dcm"), np.zeros((30, 30), np.uint16)),
], ids=["png", "dicom"])
def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch, make):
    make(tmp_path / "x")
    path = next(tmp_path.iterdir())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 900 pixels > 2 x 100
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(path)
    monkeypatch.undo()
    check_image(read_image(path))


def test_refuses_when_truncated_images_are_allowed(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(ramp()))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        read_image(path)


# ---------------------------------------------------------------------------- sample_data

def _sample_files(*parts):
    return sorted(p for p in SAMPLE_DATA.joinpath(*parts).rglob("*")
                  if p.is_file() and p.name != "README.md")


def test_sample_data_class_folders_read():
    counts = {}
    for split in ("train", "val", "test"):
        for cls in ("fractured", "not fractured"):
            files = _sample_files(split, cls)
            counts[split, cls] = len(files)
            for path in files:
                check_image(read_image(path))
    assert counts == {(s, c): n for s, n in (("train", 60), ("val", 20), ("test", 20))
                      for c in ("fractured", "not fractured")}
    assert {sniff_format(p) for p in _sample_files("test")} >= {"jpeg", "png", "dicom"}
    assert {image_info(p)["bit_depth"] for p in _sample_files("train")} == {8, 12, 16}


def test_sample_data_extras():
    extras = SAMPLE_DATA / "extras"
    good = [p for p in _sample_files("extras") if p.parent == extras]
    broken = _sample_files("extras", "broken")
    assert len(good) >= 12 and len(broken) == 3
    images = {p.name: read_image(p) for p in good}
    for img in images.values():
        check_image(img)
    for path in broken:
        with pytest.raises(ImageReadError, match=path.name):
            read_image(path)
    reference = images["mono2_12bit.dcm"]
    assert reference.shape == (160, 128)
    # The same phantom, stored every which way, reads as the same picture.
    for name in ("mono1_12bit.dcm", "multiframe.dcm", "IM0001", "png_12bit_in_16.png",
                 "tiff_12bit_in_16.tif", "rescale_16bit.dcm"):
        np.testing.assert_allclose(images[name], reference, atol=1e-3, err_msg=name)
    for name in ("png_named.jpg", "phantom.gif", "rgba.png", "palette.png",
                 "exif_rotated.jpg"):
        assert images[name].shape == (160, 128), name
        assert np.abs(images[name] - reference).mean() < 0.02, name
    assert images["windowed.dcm"].mean() < reference.mean() / 2  # soft tissue windowed out
    assert sniff_format(extras / "png_named.jpg") == "png"


@pytest.mark.slow
def test_sample_data_regenerates_identically(tmp_path):
    out = tmp_path / "sample"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_sample_data.py"),
                    "--out", str(out)], check=True, capture_output=True)
    committed = {p.relative_to(SAMPLE_DATA) for p in _sample_files()}
    fresh = {p.relative_to(out) for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != "README.md"}
    assert fresh == committed
    for rel in sorted(committed):
        if rel.parts[-2] == "broken":
            continue
        # Pixels, not bytes: another libjpeg or zlib may encode the same pixels differently.
        np.testing.assert_allclose(read_image(out / rel), read_image(SAMPLE_DATA / rel),
                                   atol=2 / 255, err_msg=str(rel))


# ---------------------------------------------------------------------------- real X-rays

@pytest.fixture(scope="module")
def real_scan():
    """Every distinct real file (by sha256), read once: {sha: (manifest row, result)}."""
    root = require_real_data()
    with open(root / "manifest.csv", newline="") as f:
        rows = {}
        for row in csv.DictReader(f):
            rows.setdefault(row["sha256"], row)
    results = {}
    for sha, row in sorted(rows.items()):
        path = root / "blobs" / sha
        try:
            results[sha] = (row, read_image(path), image_info(path))
        except ImageReadError as e:
            results[sha] = (row, e, None)
    return results


@pytest.mark.realdata
def test_real_every_file_reads_or_fails_clearly(real_scan):
    assert len(real_scan) == 2503
    failures = []
    for sha, (row, result, info) in real_scan.items():
        if isinstance(result, ImageReadError):
            assert sha in str(result)  # names the file
            failures.append(str(result))
        else:
            check_image(result)
            assert result.shape == (info["height"], info["width"])
    # The data set's README: a few files are truncated. They must fail, and only they.
    assert 1 <= len(failures) <= 10
    assert all("truncated" in msg for msg in failures)


@pytest.mark.realdata
def test_real_modes_and_formats_occur_and_read(real_scan):
    read = [(row, info) for row, result, info in real_scan.values() if info is not None]
    assert {"RGB", "RGBA", "P", "L"} <= {info["mode"] for _, info in read}
    misnamed = [row for row, info in read
                if row["filename"].lower().endswith((".jpg", ".jpeg")) and info["format"] != "jpeg"]
    assert misnamed, "the data set has .jpg files that are PNG inside"


@pytest.mark.realdata
def test_real_misnamed_files_read_under_their_names(real_data_root):
    jpgs = sorted(real_data_root.rglob("*.jpg"))
    misnamed = [p for p in jpgs if sniff_format(p) not in ("jpeg", None)]
    assert misnamed
    for path in misnamed:
        check_image(read_image(path))


@pytest.mark.realdata
def test_real_colour_content_only_in_fractured(real_scan):
    """has_colour finds the annotated figures; the README says they are all 'fractured'."""
    root = require_real_data()
    coloured = []
    for sha, (row, result, info) in sorted(real_scan.items()):
        # Every stored-colour PNG, and every 16th stored-colour JPEG (to keep this quick).
        if info and info["is_colour"] and (info["format"] != "jpeg" or int(sha, 16) % 16 == 0):
            if image_info(root / "blobs" / sha, decode=True)["has_colour"]:
                coloured.append(row["class"])
    assert coloured and set(coloured) == {"fractured"}

