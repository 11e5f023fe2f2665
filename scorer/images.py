"""Reading any X-ray a hospital has into one intensity image in [0, 1].

`read_image` decides the format from the file's bytes, never its name (exported data sets are
full of PNGs called .jpg), decodes it completely, and returns ONE float32 image (H, W) in [0, 1]:

- JPEG, PNG, BMP, TIFF, GIF (first frame) and WebP (web exports end up in data sets) through
  Pillow, in every mode Pillow produces. Only these plugins are ever tried: a hospital share
  also holds PDFs and EPS files, and Pillow's EPS plugin would run Ghostscript on them.
- DICOM through pydicom: modality LUT (Rescale Slope/Intercept), then the VOI LUT or the first
  Window Center/Width, then MONOCHROME1 inverted. Without a VOI the stored bit depth (Bits
  Stored) defines black and white. Multi-frame files give their first frame.
- 16-bit pixels are scaled by their real depth where the file states it (PNG sBIT, TIFF
  MaxSampleValue/BitsPerSample, DICOM Bits Stored), else by 65535; never squeezed to 8 bits.
- Colour becomes grey with the ITU-R 601 luma weights, computed on floats. Alpha is dropped,
  not composited: a radiograph's intensity is in the colour channels, and compositing would
  paint the transparent parts with whichever background colour we picked, an invented signal.
- EXIF orientation is applied, so the model sees the image the way a viewer shows it.
- Anything that cannot be read raises `ImageReadError` naming the file and the reason. A
  truncated file is an error, never an image with a grey bottom half, and Pillow's
  decompression-bomb guard stays on.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile

# Suffixes the file discovery treats as images. The reader itself ignores names; this only
# decides which files in a folder are worth opening (see `fxscore.files.is_candidate`).
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp",
    ".dcm", ".dicom", ".dic",
})

# sniff_format name -> the one Pillow plugin allowed to open it.
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF",
                "webp": "WEBP"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"}
_HEAD = 132  # enough for every magic number, DICOM's 'DICM' at offset 128 included


class ImageReadError(Exception):
    """A file could not be read as an image; the message names the file and the reason."""


# ---------------------------------------------------------------------------- format sniffing

def _format_of(head: bytes) -> str | None:
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # TIFF, BigTIFF
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM":
        return "bmp"
    return None


def _read_head(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read(_HEAD)


def sniff_format(path: str | os.PathLike) -> str | None:
    """The image format from the file's first bytes ("jpeg", "png", "dicom", "gif", "tiff",
    "webp", "bmp"), or None if it is none of them or cannot be opened."""
    try:
        return _format_of(_read_head(path))
    except OSError:
        return None


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True if the file carries the DICOM Part 10 marker 'DICM' at byte 128."""
    return sniff_format(path) == "dicom"


# ---------------------------------------------------------------------------- reading

def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file -> float32 array (H, W) with values in [0, 1].

    Raises ImageReadError (naming the file and the reason) for anything that is not a complete,
    decodable image.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A global switch some other library may flip; with it, truncated X-rays would decode
        # with a grey lower part and be scored as if whole. Refuse rather than mis-score.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code in "
                           "this process); fxscore refuses to read images with it on because "
                           "truncated files would load half grey. Set it back to False.")
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD)
            fmt = _format_of(head)
            if fmt == "dicom":
                return _read_dicom(f, path)
            if fmt is None:
                if Path(path).suffix.lower() in (".dcm", ".dicom", ".dic"):
                    # DICOM without the 128-byte preamble (pre-Part 10 files) still exist.
                    return _read_dicom(f, path, force=True)
                raise ImageReadError(_not_an_image(path, head))
            f.seek(0)
            return _read_pil(f, path, fmt)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a directory, not an image file") from None
    except PermissionError as e:
        raise ImageReadError(f"{path}: permission denied ({e.strerror})") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{path}: refused as a possible decompression bomb: "
                             f"{str(e).rstrip('.')}. If this "
                             "is a genuine image, raise PIL.Image.MAX_IMAGE_PIXELS in the "
                             "calling program.") from e
    except MemoryError as e:
        raise ImageReadError(f"{path}: not enough memory to decode this image") from e
    except Exception as e:  # noqa: BLE001 - decoders raise anything on corrupt data
        raise ImageReadError(f"{path}: {_describe(e)}") from e


def _not_an_image(path: str | os.PathLike, head: bytes) -> str:
    if not head:
        return f"{path}: file is empty (0 bytes)"
    return (f"{path}: not an image (content starts with {head[:16]!r}; expected JPEG, PNG, TIFF, "
            "BMP, GIF, WebP or DICOM)")


def _describe(e: Exception) -> str:
    msg = str(e) or type(e).__name__
    if "truncated" in msg or isinstance(e, EOFError):
        return f"file is truncated or corrupt ({msg})"
    return f"cannot decode image ({type(e).__name__}: {msg})"


# ---------------------------------------------------------------------------- Pillow formats

def _read_pil(f, path: str | os.PathLike, fmt: str) -> np.ndarray:
    with Image.open(f, formats=[_PIL_FORMATS[fmt]]) as im:
        im.load()  # decode now, so a truncated file raises here instead of loading half grey
        depth = _declared_bit_depth(im, f, fmt)
        im = _exif_upright(im)
        return _to_intensity(im, depth)


def _exif_upright(im: Image.Image) -> Image.Image:
    from PIL import ImageOps
    # Only transpose when needed: exif_transpose copies the whole image even when it is upright.
    orientation = im.getexif().get(0x0112, 1)
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(im)
    return im


def _declared_bit_depth(im: Image.Image, f, fmt: str) -> int | None:
    """Significant bits of a 16-bit greyscale image, when the file says (else None).

    Only 8..16 is believed: writers do put nonsense here (libtiff can leave MaxSampleValue 1).
    """
    if not (im.mode.startswith("I;16") or im.mode == "I"):
        return None
    depth = _png_sbit(f) if fmt == "png" else _tiff_depth(im) if fmt == "tiff" else None
    return depth if depth is not None and 8 <= depth <= 16 else None


def _tiff_depth(im: Image.Image) -> int | None:
    """From MaxSampleValue (4095 for 12-bit data) if plausible, else BitsPerSample."""
    def first(tag: int) -> int:
        value = im.tag_v2.get(tag)
        return int(value[0] if isinstance(value, tuple) and value else value or 0)

    from_max = first(281).bit_length()
    return from_max if 8 <= from_max <= 16 else first(258) or None


def _png_sbit(f) -> int | None:
    """The PNG sBIT chunk's grey depth (Pillow does not read it); it precedes IDAT."""
    f.seek(8)
    while True:
        header = f.read(8)
        if len(header) < 8:
            return None
        length, kind = struct.unpack(">I4s", header)
        if kind == b"sBIT":
            bits = f.read(length)
            return bits[0] if bits and 1 <= bits[0] <= 16 else None
        if kind in (b"IDAT", b"IEND"):
            return None
        f.seek(length + 4, os.SEEK_CUR)  # data + CRC


def _to_intensity(im: Image.Image, depth: int | None) -> np.ndarray:
    """A decoded Pillow image in any mode -> float32 (H, W) in [0, 1]."""
    mode = im.mode
    if mode == "1":
        out = np.asarray(im, dtype=np.float32)  # bool -> 0.0 / 1.0
    elif mode in ("L", "LA", "La"):
        grey = im if mode == "L" else im.getchannel(0)
        out = np.asarray(grey).astype(np.float32)
        out /= 255
    elif mode in ("P", "PA"):
        out = _palette_to_grey(im)
    elif mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        out = _luma(np.asarray(im))
    elif mode in ("CMYK", "YCbCr", "HSV", "LAB"):
        try:
            rgb = im.convert("RGB")
        except ValueError as e:
            raise ValueError(f"colour mode {mode} cannot be converted to RGB ({e})") from e
        out = _luma(np.asarray(rgb))
    elif mode.startswith("I;16") and not mode.startswith("I;16S"):
        pixels = np.asarray(im)
        if depth and pixels.size and int(pixels.max()) >= 2 ** depth:
            depth = None  # the data does not fit the stated depth, so the statement is wrong
        out = pixels.astype(np.float32)
        out /= 2 ** (depth or 16) - 1
    elif mode.startswith("I"):  # 32-bit or signed integer data
        out = _scale_wide_ints(np.asarray(im), depth)
    elif mode == "F":
        out = _scale_floats(np.asarray(im, dtype=np.float32))
    else:
        raise ValueError(f"unsupported image mode {mode!r}")
    np.clip(out, 0.0, 1.0, out=out)
    return np.ascontiguousarray(out)


def _luma(rgb: np.ndarray, white: int = 255) -> np.ndarray:
    """(H, W, >=3) integers -> float32 (H, W) in [0, white] / white, BT.601 weights.

    Channels past the third (alpha, padding) are ignored. One float32 matrix-vector product
    is several times faster than three weighted channel sums.
    """
    grey = rgb[..., :3].astype(np.float32) @ _LUMA
    grey /= white
    return grey


def _palette_to_grey(im: Image.Image) -> np.ndarray:
    # Map the palette once (256 entries) instead of expanding every pixel to RGB.
    palette = np.asarray(im.getpalette("RGB") or [], dtype=np.float32).reshape(-1, 3)
    lut = np.zeros(256, dtype=np.float32)
    lut[:len(palette)] = (palette[:256] @ _LUMA) / 255
    index = np.asarray(im if im.mode == "P" else im.getchannel(0))
    return lut[index]


def _scale_wide_ints(arr: np.ndarray, depth: int | None) -> np.ndarray:
    """Integer images wider than 16 bits, or signed: there is no nominal white for them.

    A stated depth wins; data that fits 0..65535 is taken as 16-bit (the usual case: 16-bit
    pixels stored in a 32-bit container); anything else is stretched min..max.
    """
    out = arr.astype(np.float32)
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if depth and lo >= 0 and hi < 2 ** depth:
        out /= 2 ** depth - 1
    elif lo >= 0 and hi <= 65535:
        out /= 65535
    else:
        out -= lo
        out /= max(hi - lo, 1)
    return out


def _scale_floats(arr: np.ndarray) -> np.ndarray:
    """Float images are taken as intensities when within [0, 1], else stretched min..max."""
    out = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    if out.size and (out.min() < 0 or out.max() > 1):
        lo, hi = float(out.min()), float(out.max())
        out = (out - lo) / np.float32(hi - lo or 1)
    return out.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------- DICOM

def _pydicom(path):
    """pydicom, lazily (most files are not DICOM); its pixel API needs pydicom 3."""
    import pydicom
    if int(pydicom.__version__.split(".")[0]) < 3:
        raise ImageReadError(f"{path}: reading DICOM needs pydicom>=3 (installed: "
                             f"{pydicom.__version__}); run: pip install -U 'pydicom>=3'")
    return pydicom


def _read_dicom(f, path: str | os.PathLike, force: bool = False) -> np.ndarray:
    pydicom = _pydicom(path)
    from pydicom.errors import InvalidDicomError

    f.seek(0)
    try:
        ds = pydicom.dcmread(f, force=force)
    except InvalidDicomError as e:
        raise ImageReadError(f"{path}: not a readable DICOM file ({e})") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        kind = getattr(ds, "SOPClassUID", None)
        kind = f" ({kind.name})" if kind is not None else ""
        raise ImageReadError(f"{path}: DICOM file has no pixel data{kind}: not an image, or "
                             "the file is truncated")
    if "TransferSyntaxUID" not in ds.file_meta:
        # No file meta (no preamble): the encoding pydicom detected is the transfer syntax.
        from pydicom import uid
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit else
                                          uid.ExplicitVRLittleEndian if little else
                                          uid.ExplicitVRBigEndian)
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageReadError(f"{path}: DICOM file lacks Rows/Columns")
    if Image.MAX_IMAGE_PIXELS and ds.Rows * ds.Columns > 2 * Image.MAX_IMAGE_PIXELS:
        # The same limit Pillow applies to other formats: compressed DICOM can be a bomb too.
        raise ImageReadError(f"{path}: refused as a possible decompression bomb: "
                             f"{ds.Columns}x{ds.Rows} pixels exceeds twice "
                             f"PIL.Image.MAX_IMAGE_PIXELS ({Image.MAX_IMAGE_PIXELS})")
    arr = _first_frame(ds, path)
    return _dicom_intensity(ds, arr, path)


def _first_frame(ds, path) -> np.ndarray:
    from pydicom.pixels import pixel_array
    try:
        return pixel_array(ds, index=0)  # decodes only the first frame; YBR comes back as RGB
    except Exception as e:  # noqa: BLE001
        hint = _decoder_hint(ds, e)
        raise ImageReadError(f"{path}: cannot decode DICOM pixel data: {hint}") from e


def _decoder_hint(ds, e: Exception) -> str:
    """Name the transfer syntax and what to `pip install` when a decoder plugin is missing."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        return f"{type(e).__name__}: {e}"
    from pydicom.pixels import get_decoder
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:  # a transfer syntax pydicom has no decoder for at all
        decoder = None
    if decoder is not None and not decoder.is_available:
        installs = []
        for dep in decoder.missing_dependencies:  # e.g. "pylibjpeg - requires pylibjpeg>=2.0 and x"
            reqs = dep.split("requires", 1)[-1].replace(" and ", " ").split()
            reqs = ["python-gdcm" if r.startswith("gdcm") else r for r in reqs if r != "numpy"]
            installs.append("pip install " + " ".join(f"'{r}'" for r in reqs))
        return (f"transfer syntax {ts.name} ({ts}) needs a pydicom decoder plugin that is not "
                f"installed; install one of: {' | '.join(installs)}")
    if ts.is_compressed:
        return f"transfer syntax {ts.name} ({ts}): {type(e).__name__}: {e}"
    return f"{type(e).__name__}: {e}"


def _dicom_intensity(ds, arr: np.ndarray, path) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        white = 2 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1
        return _finish(_luma(rgb, white))
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"):
        return _finish(_luma(arr, 2 ** bits - 1))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(f"{path}: unsupported DICOM Photometric Interpretation {photometric}")
    if arr.ndim != 2:
        raise ImageReadError(f"{path}: expected one greyscale frame, got pixel shape {arr.shape}")

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
    if photometric == "MONOCHROME1":  # low values are white; invert only after the VOI
        out = 1 - out
    return _finish(out)


def _has_window(ds) -> bool:
    """Window Center/Width present and usable. An invalid width (below 1 for LINEAR, not
    positive otherwise) is treated as absent, as viewers do, rather than making the file
    unreadable."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return False
    try:
        first = width[0]  # multi-valued: the first window is the primary one
    except (TypeError, IndexError, KeyError):
        first = width
    try:
        width = float(first)
    except (TypeError, ValueError):
        return False
    linear = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() == "LINEAR"
    return width >= 1 if linear else width > 0


def _finish(out: np.ndarray) -> np.ndarray:
    out = np.nan_to_num(out.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0,
                        copy=False)
    np.clip(out, 0.0, 1.0, out=out)
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------------------- metadata

def image_info(path: str | os.PathLike, *, decode: bool = False) -> dict[str, Any]:
    """What a file holds, from its header: format (from content), mode, width and height (as
    read_image returns it, EXIF orientation applied), bit_depth, is_colour (stored with colour
    channels or a non-grey palette).

    decode=True also decodes the pixels to add has_colour: whether the image visibly uses
    colour (annotations, photos), not merely an RGB container holding a grey radiograph.
    Raises ImageReadError like read_image.
    """
    try:
        head = _read_head(path)
    except OSError as e:
        raise ImageReadError(f"{path}: cannot open ({e.strerror or e})") from e
    fmt = _format_of(head)
    if fmt is None:
        raise ImageReadError(_not_an_image(path, head))
    try:
        info = _dicom_info(path) if fmt == "dicom" else _pil_info(path, fmt)
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(f"{path}: cannot read the image header; {_describe(e)}") from e
    if decode:
        info["has_colour"] = _has_colour(path, info) if info["is_colour"] else False
    return info


def _pil_info(path, fmt: str) -> dict[str, Any]:
    with open(path, "rb") as f, Image.open(f, formats=[_PIL_FORMATS[fmt]]) as im:
        mode = im.mode
        depth = _declared_bit_depth(im, f, fmt)
        if depth is None:
            depth = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32,
                     "F": 32}.get(mode, 8)
        if mode in ("P", "PA"):
            pal = np.asarray(im.getpalette("RGB") or [0, 0, 0]).reshape(-1, 3)
            colour = bool((pal.max(axis=1) != pal.min(axis=1)).any())
        else:
            colour = mode in _COLOUR_MODES
        width, height = im.size
        # Pillow's PNG getexif() decodes the whole image unless eXIf came before the pixels.
        exif = im.getexif() if fmt != "png" or "exif" in im.info else {}
        if exif.get(0x0112, 1) in (5, 6, 7, 8):  # read_image turns these by 90 degrees
            width, height = height, width
        return {"format": fmt, "mode": mode, "width": width, "height": height,
                "bit_depth": depth, "is_colour": colour}


def _dicom_info(path) -> dict[str, Any]:
    ds = _pydicom(path).dcmread(path, stop_before_pixels=True)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    return {"format": "dicom", "mode": photometric, "width": int(ds.get("Columns", 0)),
            "height": int(ds.get("Rows", 0)),
            "bit_depth": int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0),
            "is_colour": not photometric.startswith("MONOCHROME")}


def _has_colour(path, info: dict[str, Any]) -> bool:
    """More than 0.01% of pixels with a channel spread above 24/255.

    Grey radiographs saved as RGB JPEG differ between channels only by a few levels of
    chroma-rounding noise (never above 24 in the 2,300 of them in the real data set); a small
    coloured arrow on a 224 px image covers some tens of pixels.
    """
    if info["format"] == "dicom":
        return bool(info["is_colour"])
    try:
        with Image.open(path, formats=[_PIL_FORMATS[info["format"]]]) as im:
            im.load()
            rgb = np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(f"{path}: {_describe(e)}") from e
    spread = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
    return bool(np.count_nonzero(spread > 24) > 0.0001 * spread.size)
