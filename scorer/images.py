"""Reading any X-ray a hospital has into one intensity image in [0, 1].

`read_image` decides the format from the file's bytes, never its name (exported data sets are
full of PNGs called .jpg), decodes it, and returns ONE float32 image (H, W) in [0, 1]:

- JPEG, PNG, BMP, TIFF, GIF (first frame) and WebP (web exports end up in data sets) through
  Pillow, in every mode Pillow produces. Only these plugins are ever tried: a hospital share
  also holds PDFs and EPS files, and Pillow's EPS plugin would run Ghostscript on them.
- DICOM through pydicom, in `fxscore.dicom`: modality LUT, VOI LUT or the first window,
  MONOCHROME1 inverted, Bits Stored; multi-frame files give their first frame.
- 16-bit pixels are scaled by their real depth where the file states it (PNG sBIT, TIFF
  MaxSampleValue/BitsPerSample, DICOM Bits Stored), else by 65535; never squeezed to 8 bits.
- Colour becomes grey with the ITU-R 601 luma weights, computed on floats. Alpha is dropped,
  not composited: a radiograph's intensity is in the colour channels, and compositing would
  paint the transparent parts with whichever background colour we picked, an invented signal.
- EXIF orientation is applied, so the model sees the image the way a viewer shows it.

Safety, for a night's batch over a hospital share:

- Files are opened by `open_regular`: non-blocking, and whatever is not a regular file once
  opened (a FIFO swapped in after the folder was listed, a socket, a device) is an error at
  once, never a read that waits for ever.
- Decompression bombs are refused from the header, before anything is inflated: the decoded
  pixels may not exceed `MAX_DECODED_BYTES` (2 GiB; environment variable
  FXSCORE_MAX_DECODED_BYTES, e.g. "8G", raises it), for every format, DICOM's deflated data sets
  included; Pillow's own MAX_IMAGE_PIXELS guard stays on as well.
- Anything that cannot be read raises `ImageReadError` naming the file and the reason. A
  truncated file is an error, never an image with a grey bottom half. Messages describe a file
  (its size, its format, what is wrong); they never quote its bytes, nor the text of a
  decoder's exception, which can carry them (`ln -s /etc/shadow x.png` must not leak).

Reduced-scale decoding (`min_size`): a caller that will shrink the image to a model's input
anyway may let large files decode at a reduced scale, JPEG in the DCT domain (Pillow `draft`,
1/2, 1/4, 1/8), other formats by averaging blocks of pixels (Pillow `reduce`). The factor F is
chosen from the header alone: the largest that divides both sides (so the reduced image covers
exactly what the full one does) and keeps both sides at least `KEEP_FACTOR` (3) times the
largest side of `min_size`. Why 3: the final antialiased resize averages over a triangle as
wide as its scale s, of variance s^2/6; an F x F block average adds F^2/12, which for F <= s/k
is 1/(2 k^2) of it: 12% more blur for k = 2, 6% for k = 3 (measured on the 223 real X-rays
where it applies, at 224 px: the normalised input moves by at most 0.09 at any pixel and 0.002
on average for k = 3, 0.15 and 0.004 for k = 2). The result depends only on the file and
`min_size`; files no factor fits decode in full.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
from PIL import Image, ImageFile

# Suffixes the file discovery treats as images. The reader itself ignores names; this only
# decides which files in a folder are worth opening (see `fxscore.files.is_candidate`).
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp",
    ".dcm", ".dicom", ".dic",
})
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")

_LIMIT_ENV = "FXSCORE_MAX_DECODED_BYTES"
LIMIT_HINT = (f"fxscore.images.MAX_DECODED_BYTES; if this is a genuine image, raise it with "
              f"the environment variable {_LIMIT_ENV}, e.g. {_LIMIT_ENV}=8G")
KEEP_FACTOR = 3  # reduced-scale decoding keeps >= this x the largest side of min_size


def with_slack(nbytes: int) -> int:
    """A peak estimate plus what it does not itemise: decoder buffers and allocator rounding
    (1 MiB and an eighth, measured on 4000 x 3000 images in every mode)."""
    return (1 << 20) + nbytes + nbytes // 8


# sniff_format name -> the one Pillow plugin allowed to open it.
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF",
                "webp": "WEBP"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601
_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"}
_HEAD = 132  # enough for every magic number, DICOM's 'DICM' at offset 128 included
# Pillow's in-memory bytes per pixel: 1 for "1", L, P; 2 for I;16*; 4 for everything else
# (multi-band 8-bit modes are stored as 32-bit pixels, RGB included).
_ONE_BYTE_MODES = frozenset({"1", "L", "P"})
# Modes Image.reduce averages as read_image uses them (not P: averaging palette indices is
# meaningless; not RGBA and LA, which it averages premultiplied by alpha).
_REDUCIBLE = frozenset({"L", "La", "RGB", "RGBX", "RGBa"})
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


class ImageReadError(Exception):
    """A file could not be read as an image; the message names the file and the reason."""


def _limit_from_env() -> int:
    """2 GiB, or FXSCORE_MAX_DECODED_BYTES: bytes, or with a binary suffix K, M, G, T."""
    text = os.environ.get(_LIMIT_ENV, "").strip()
    if not text:
        return 2 << 30
    match = re.fullmatch(r"(\d+)\s*(?:([KMGT])(?:i?B)?)?", text, re.IGNORECASE)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{_LIMIT_ENV}={text!r} is not a positive size; give bytes (e.g. "
                         "4294967296) or a number with K, M, G or T (binary multiples, e.g. 8G)")
    return int(match.group(1)) << 10 * " KMGT".index((match.group(2) or " ").upper())


# The most bytes of decoded pixels any file may decode to (every frame of a DICOM file, the
# inflated data set of a deflated one); larger files raise ImageReadError before decoding.
# Read at each call, so a program may also set it: fxscore.images.MAX_DECODED_BYTES = 8 << 30.
MAX_DECODED_BYTES: int = _limit_from_env()


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def check_decoded(nbytes: int, name: str, what: str) -> None:
    """Refuse (ImageReadError) a file whose decoded pixels would exceed MAX_DECODED_BYTES."""
    if nbytes > MAX_DECODED_BYTES:
        raise ImageReadError(f"{name}: refused as a possible decompression bomb: its pixels "
                             f"({what}) would decode to {format_bytes(nbytes)}, more than "
                             f"{format_bytes(MAX_DECODED_BYTES)} ({LIMIT_HINT})")


# ---------------------------------------------------------------------------- opening

_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"))


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open a regular file for binary reading, deciding "regular" from the opened descriptor.

    The open itself never blocks (O_NONBLOCK: a FIFO without a writer would otherwise wait for
    ever, and a listing said nothing about what the name is by the time it is opened); then
    fstat() decides, and O_NONBLOCK is cleared for ordinary reads. A FIFO, socket, device or
    directory raises ImageReadError("<path>: not a regular file (FIFO)"), as do missing or
    unreadable files.
    """
    name = shown(path)
    flags = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
             | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0))
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageReadError(f"{name}: no such file") from None
    except PermissionError as e:
        raise ImageReadError(f"{name}: permission denied ({e.strerror})") from None
    except IsADirectoryError:
        raise ImageReadError(f"{name}: not a regular file (directory)") from None
    except OSError as e:  # ENXIO (a socket), ELOOP, ENAMETOOLONG, EIO...
        kind = _kind_of(path)
        if kind:
            raise ImageReadError(f"{name}: not a regular file ({kind})") from None
        raise ImageReadError(f"{name}: cannot open ({e.strerror or type(e).__name__})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _KINDS if test(mode)), "not a plain file")
            raise ImageReadError(f"{name}: not a regular file ({kind})")
        if flags & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _kind_of(path) -> str | None:
    """What a path that could not be opened is, if not a regular file (a socket cannot be
    opened at all: ENXIO)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return next((k for test, k in _KINDS if test(mode)), None)


def shown(name: str | os.PathLike | bytes) -> str:
    """A file name for a one-line message: control characters (a name may hold a newline)
    and undecodable bytes are written as escapes."""
    text = os.fsdecode(name) if isinstance(name, bytes) else str(name)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@contextlib.contextmanager
def _source(source, name: str | None) -> Iterator[tuple[BinaryIO, str]]:
    """(binary file positioned at 0, name for messages) for a path or a file object."""
    label = _label(source, name)
    if hasattr(source, "read"):
        if not (hasattr(source, "seekable") and source.seekable()):
            source = io.BytesIO(source.read())
        source.seek(0)
        yield source, label
        return
    with open_regular(source) as f:
        yield f, label


def _label(source, name: str | None) -> str:
    """What messages call a source: `name`, else the path, or the file object's name."""
    if name is not None:
        return shown(name)
    if hasattr(source, "read"):
        return shown(getattr(source, "name", None) or "<stream>")
    return shown(source)


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


def sniff_format(source: str | os.PathLike | BinaryIO) -> str | None:
    """The image format from the file's first bytes ("jpeg", "png", "dicom", "gif", "tiff",
    "webp", "bmp"), or None if it is none of them or cannot be opened as a regular file."""
    try:
        with _source(source, None) as (f, _):
            return _format_of(f.read(_HEAD))
    except (ImageReadError, OSError):
        return None


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True if the file carries the DICOM Part 10 marker 'DICM' at byte 128."""
    return sniff_format(path) == "dicom"


# ---------------------------------------------------------------------------- reading

# Images smaller than this on a side are not radiographs (a 1 x 1 black image scored 0.9998
# "fractured"): an error row, not a score. The smallest real X-ray of the public set is 100 px.
MIN_SIDE = 32


def check_min_side(image: np.ndarray, source: str | os.PathLike | BinaryIO,
                   name: str | None = None) -> np.ndarray:
    """`image` (as read from `source`) if it has at least MIN_SIDE pixels on both sides, else
    ImageReadError naming the file: what the model reads, in this process
    (`scoring.model_input`) or in a decode worker (`isolate.decode_preprocessed`)."""
    if min(image.shape[:2]) >= MIN_SIDE:
        return image
    raise ImageReadError(f"{_label(source, name)}: {image.shape[1]} x {image.shape[0]} pixels "
                         f"is too small to be a radiograph (fxscore scores images of at least "
                         f"{MIN_SIDE} x {MIN_SIDE} pixels)")

def read_image(source: str | os.PathLike | BinaryIO, *, name: str | None = None,
               min_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image -> float32 array (H, W) with values in [0, 1].

    source: a path (opened with `open_regular`) or a seekable binary file object holding the
    file's bytes from offset 0; name: what messages call it (default: the path, or the file
    object's name). min_size=(h, w): the caller resizes to this afterwards, so a large image
    may be decoded at a reduced scale that keeps at least KEEP_FACTOR x max(h, w) pixels on
    both sides (JPEG and Pillow formats; DICOM is always decoded whole).

    Raises ImageReadError (naming the file and the reason) for anything that is not a complete,
    decodable image, or whose decoded pixels would exceed MAX_DECODED_BYTES.
    """
    return _read(source, name, min_size, colour=False)[0]


def read_with_colour(source: str | os.PathLike | BinaryIO, *, name: str | None = None,
                     min_size: tuple[int, int] | None = None) -> tuple[np.ndarray, bool]:
    """(read_image(...), image_info(..., decode=True)["has_colour"]) with one decode where
    read_image decodes in full anyway (no JPEG draft): the OOD flag's colour rule, at the
    cost of the test alone on the pixels already decoded. A DICOM file is colour when stored
    so (its header). Raises ImageReadError like read_image; a colour test that fails on an
    image read_image can read says "no colour" (the image is scored, as grey).
    """
    return _read(source, name, min_size, colour=True)


def _read(source, name: str | None, min_size, colour: bool) -> tuple[np.ndarray, bool]:
    _refuse_truncated_mode()
    with _source(source, name) as (f, label):
        with _errors_described(label):
            fmt = _format_of(f.read(_HEAD))
            if fmt == "dicom" or (fmt is None and _dicom_by_suffix(label)):
                from .dicom import read_dicom
                # DICOM without the 128-byte preamble (pre-Part 10 files) still exist.
                image = read_dicom(f, label, force=fmt is None)
                if not colour:
                    return image, False
                f.seek(0)
                try:
                    return image, bool(image_info(f, name=label, decode=True)["has_colour"])
                except ImageReadError:
                    return image, False
            if fmt is None:
                raise ImageReadError(_not_an_image(label, f))
            f.seek(0)
            return _read_pil(f, label, fmt, min_size, colour)


def decoded_nbytes(source: str | os.PathLike | BinaryIO,
                   min_size: tuple[int, int] | None = None, *, name: str | None = None) -> int:
    """Bytes of pixel memory read_image(source, min_size=min_size) holds at its peak, from the
    header alone: the decoder's output (at the reduced scale min_size allows) plus the arrays
    made from it, the float32 result included. For a memory budget over images in flight.

    Raises ImageReadError like read_image for files whose header cannot be read (or that
    read_image would refuse as too large).
    """
    return _decode_cost(source, min_size, name, colour=False)[0]


def colour_read_cost(source: str | os.PathLike | BinaryIO,
                     min_size: tuple[int, int] | None = None, *,
                     name: str | None = None) -> tuple[int, bool]:
    """(decoded_nbytes of `read_with_colour`, whether the file is stored in colour), from one
    header read. A file stored in grey shows no colour, so its peak is read_image's; one
    stored in colour that read_image decodes at reduced scale is decoded in full as well.
    A DICOM file says (False): its colour is in its header (`image_info`).
    """
    return _decode_cost(source, min_size, name, colour=True)


def _decode_cost(source, min_size, name: str | None, colour: bool) -> tuple[int, bool]:
    with _source(source, name) as (f, label):
        with _errors_described(label):
            fmt = _format_of(f.read(_HEAD))
            if fmt == "dicom" or (fmt is None and _dicom_by_suffix(label)):
                from . import dicom
                header = dicom.read_header(f, label, force=fmt is None)
                dicom.check_size(header, label)
                return dicom.peak_bytes(header, label), False
            if fmt is None:
                raise ImageReadError(_not_an_image(label, f))
            f.seek(0)
            with Image.open(f, formats=[_PIL_FORMATS[fmt]]) as im:
                plan = _Plan(im, fmt, min_size)
                check_decoded(plan.decoded, label, plan.what)
                if colour and _stored_in_colour(im):  # the colour test decodes in full
                    return max(plan.peak, _Plan(im, fmt, None).peak), True
                return plan.peak, False


def _refuse_truncated_mode() -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A global switch some other library may flip; with it, truncated X-rays would decode
        # with a grey lower part and be scored as if whole. Refuse rather than mis-score.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code in "
                           "this process); fxscore refuses to read images with it on because "
                           "truncated files would load half grey. Set it back to False.")


def _dicom_by_suffix(label: str) -> bool:
    return Path(label).suffix.lower() in _DICOM_SUFFIXES


@contextlib.contextmanager
def _errors_described(label: str) -> Iterator[None]:
    """Every failure while decoding -> one ImageReadError line that describes, never quotes."""
    try:
        yield
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))  # Pillow's message: numbers only
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "its size"
        raise ImageReadError(f"{label}: refused as a possible decompression bomb: {size} "
                             f"exceeds twice PIL.Image.MAX_IMAGE_PIXELS "
                             f"({Image.MAX_IMAGE_PIXELS:,}); if this is a genuine image, raise "
                             "PIL.Image.MAX_IMAGE_PIXELS in the calling program") from e
    except MemoryError as e:
        raise ImageReadError(f"{label}: not enough memory to decode this image") from e
    except OSError as e:
        if e.errno is None:  # Pillow's decoders raise OSError without errno on corrupt data
            raise ImageReadError(f"{label}: {describe_error(e)}") from e
        raise ImageReadError(f"{label}: cannot read ({e.strerror or 'I/O error'})") from e
    except Exception as e:  # noqa: BLE001 - decoders raise anything on corrupt data
        raise ImageReadError(f"{label}: {describe_error(e)}") from e


def _not_an_image(label: str, f: BinaryIO) -> str:
    size = f.seek(0, os.SEEK_END)
    if not size:
        return f"{label}: file is empty (0 bytes)"
    return (f"{label}: not an image ({size:,} bytes that start with no known image signature; "
            "expected JPEG, PNG, TIFF, BMP, GIF, WebP or DICOM)")


# Words of decoder messages that mean the data stops early (Pillow, pydicom, libjpeg...).
_TRUNCATION_WORDS = ("truncated", "end of file", "eof", "not enough data", "ran out of data",
                     "premature end", "unexpected end", "doesn't match the expected length",
                     "less than the expected", "buffer is too small", "insufficient data")


def describe_error(e: BaseException, what: str = "image") -> str:
    """A decoder's exception as a description. Its text is used only to classify, never
    copied: decoders put values from the file into their messages (a DICOM header's values
    are patient data)."""
    text = str(e).lower()
    kind = type(e).__name__
    if isinstance(e, EOFError) or any(word in text for word in _TRUNCATION_WORDS):
        return f"file is truncated or corrupt ({kind} while decoding the {what})"
    return (f"cannot decode the {what} ({kind}): the file is corrupt or uses a variant of its "
            "format that cannot be decoded here")


# ---------------------------------------------------------------------------- Pillow formats

class _Plan:
    """How a Pillow image will be decoded (JPEG draft scale, then reduce factor) and its cost."""

    def __init__(self, im: Image.Image, fmt: str, min_size: tuple[int, int] | None):
        width, height = im.size
        self.mode = im.mode
        self.draft, self.reduce = _factors(im, fmt, min_size)
        if self.draft > 1:
            # libjpeg scales by 1/2, 1/4 or 1/8 in the DCT domain; an RGB JPEG is then decoded
            # as its luma (the Y channel) directly.
            self.mode = "L" if im.mode == "RGB" else im.mode
            width, height = -(-width // self.draft), -(-height // self.draft)
        self.decode_size = (width, height)
        pixel = _pillow_pixel_bytes(self.mode)
        self.decoded = width * height * pixel
        self.what = f"{im.size[0]} x {im.size[1]} pixels, mode {im.mode}"
        self.peak = with_slack(self.decoded + _transient_bytes(self.mode, width * height,
                                                               self.reduce))


def _transient_bytes(mode: str, pixels: int, factor: int) -> int:
    """What read_image holds besides the decoded image: per pixel of the image it converts,
    a transposed copy and an array copy (at most the decoded pixel's size each) and the
    float32 result."""
    pixel = _pillow_pixel_bytes(mode)
    convert = 7 if mode in ("CMYK", "YCbCr", "LAB", "HSV") else 0  # convert("RGB") + array
    small = -(-pixels // (factor * factor))
    if factor < 2:
        return pixels * (2 * pixel + 4 + convert)
    if mode in _REDUCIBLE:
        return small * (2 * pixel + 4)
    if mode in ("RGBA", "LA"):
        return pixels * 4 + small * (2 * 4 + 4)  # via a copy without alpha
    if mode.startswith("I;16"):
        return pixels * 4 + small * (2 * 4 + 4)  # via a 32-bit copy
    # Converted in full, then the float image averaged down.
    return pixels * (2 * pixel + 4 + convert) + small * 4


def _factors(im: Image.Image, fmt: str, min_size) -> tuple[int, int]:
    """(JPEG draft scale, reduce factor) for decoding at reduced scale; (1, 1) for in full.

    The total factor F is the largest that keeps both sides >= KEEP_FACTOR x max(min_size)
    and divides both sides. Blocks of F x F pixels become one; were a side not a multiple of
    F, its last reduced pixel would stand for F pixels while covering fewer, stretching the
    image by up to F - 1 pixels at that edge (a shift of a tenth of an output pixel already
    changes edge pixels by 0.3 of the normalised input, measured on the real X-rays). JPEG
    takes the power of two in F (at most 8) in the DCT domain, Pillow reduce the rest.
    """
    if not min_size:
        return 1, 1
    width, height = im.size
    room = min(width, height) // max(KEEP_FACTOR * max(int(side) for side in min_size), 1)
    draftable = fmt == "jpeg" and len(getattr(im, "tile", ())) == 1
    for total in range(room, 1, -1):
        if width % total or height % total:
            continue
        draft = next((s for s in (8, 4, 2) if total % s == 0), 1) if draftable else 1
        return draft, total // draft
    return 1, 1


def _pillow_pixel_bytes(mode: str) -> int:
    return 1 if mode in _ONE_BYTE_MODES else 2 if mode.startswith("I;16") else 4


def _read_pil(f: BinaryIO, label: str, fmt: str, min_size,
              colour: bool = False) -> tuple[np.ndarray, bool]:
    """(intensity image, whether it shows colour: False unless `colour` asks)."""
    with Image.open(f, formats=[_PIL_FORMATS[fmt]]) as im:  # reads the header only
        plan = _Plan(im, fmt, min_size)
        check_decoded(plan.decoded, label, plan.what)
        stored = colour and _stored_in_colour(im)
        shows: bool | None = None
        if plan.draft > 1:
            # Pillow takes the largest scale that keeps this size: exactly plan.draft.
            width, height = im.size
            im.draft(plan.mode, (width // plan.draft, height // plan.draft))
            if im.size != plan.decode_size:
                raise ValueError(f"JPEG draft gave {im.size}, expected {plan.decode_size}")
        im.load()  # decode now, so a truncated file raises here instead of loading half grey
        if stored and plan.draft == 1:  # these pixels are the ones the colour test decodes
            try:
                shows = _shows_colour(im)
            except Exception:  # noqa: BLE001 - colour that cannot be tested is none
                shows = False
        depth = _declared_bit_depth(im, f, fmt)
        if plan.reduce > 1:
            depth = _valid_depth(im, depth)
        orientation = im.getexif().get(0x0112, 1)
        small, late = _reduced(im, plan.reduce)
        if orientation in _TRANSPOSE:
            small = small.transpose(_TRANSPOSE[orientation])
        out = _to_intensity(small, depth)
        if late > 1:
            out = _block_mean(out, late)
    if stored and shows is None:  # decoded at reduced scale: the test decodes in full
        f.seek(0)
        try:
            shows = _has_colour(f, label, {"format": fmt})
        except ImageReadError:
            shows = False
    return np.ascontiguousarray(out), bool(shows)


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each factor x factor block; factor divides both sides (see `_factors`)."""
    h, w = image.shape
    blocks = image.reshape(h // factor, factor, w // factor, factor)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def _reduced(im: Image.Image, factor: int) -> tuple[Image.Image, int]:
    """(image reduced by factor where Pillow can average its mode, factor still to apply to
    the float intensity image: 1 when done)."""
    if factor < 2:
        return im, 1
    if im.mode in _REDUCIBLE:
        return im.reduce(factor), 1
    if im.mode in ("RGBA", "LA"):
        # Pillow reduces these premultiplied by alpha; alpha is dropped here, so drop it first.
        return im.convert(im.mode[:-1]).reduce(factor), 1
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return im.convert("I").reduce(factor), 1  # same scaling as I;16 (0..65535 data)
    return im, factor


def _valid_depth(im: Image.Image, depth: int | None) -> int | None:
    """A stated depth the whole image fits, else None: decided before any reduction, whose
    averages could hide the one pixel that proves the statement wrong."""
    if depth and im.mode.startswith("I;16"):
        try:
            top = im.getextrema()[1]
        except ValueError:  # Pillow has no extrema for I;16B
            top = int(np.asarray(im).max()) if im.width and im.height else 0
        if top >= 2 ** depth:
            return None
    return depth


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
        out = luma(np.asarray(im))
    elif mode in ("CMYK", "YCbCr", "HSV", "LAB"):
        try:
            rgb = im.convert("RGB")
        except ValueError as e:
            raise ValueError(f"colour mode {mode} cannot be converted to RGB") from e
        out = luma(np.asarray(rgb))
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


def luma(rgb: np.ndarray, white: int = 255) -> np.ndarray:
    """(H, W, >=3) integers -> float32 (H, W) in [0, white] / white, BT.601 weights.

    Channels past the third (alpha, padding) are ignored. Computed in blocks of rows: one
    float32 copy of all three channels would take 12 bytes per pixel (2 GB for a 13000 x
    13000 RGB PNG), a block takes a few megabytes.
    """
    out = np.empty(rgb.shape[:2], dtype=np.float32)
    rows = max(1, (1 << 18) // max(1, rgb.shape[1]))
    for start in range(0, rgb.shape[0], rows):
        block = rgb[start:start + rows, :, :3].astype(np.float32)
        np.matmul(block, _LUMA, out=out[start:start + rows])
    out /= white
    return out


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


def unit_float(out: np.ndarray) -> np.ndarray:
    """Any intensity array -> C-contiguous float32 in [0, 1], NaN as 0 and +inf as 1."""
    out = np.nan_to_num(out.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0,
                        copy=False)
    np.clip(out, 0.0, 1.0, out=out)
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------------------- metadata

def image_info(path: str | os.PathLike | BinaryIO, *, decode: bool = False,
               name: str | None = None) -> dict[str, Any]:
    """What a file holds, from its header: format (from content), mode, width and height (as
    read_image returns it, EXIF orientation applied), bit_depth, is_colour (stored with colour
    channels or a non-grey palette).

    decode=True also decodes the pixels to add has_colour: whether the image visibly uses
    colour (annotations, photos), not merely an RGB container holding a grey radiograph.
    Raises ImageReadError like read_image.
    """
    with _source(path, name) as (f, label):
        fmt = _format_of(f.read(_HEAD))
        if fmt is None:
            raise ImageReadError(_not_an_image(label, f))
        f.seek(0)
        try:
            if fmt == "dicom":
                from .dicom import dicom_info
                info = dicom_info(f, label)
            else:
                info = _pil_info(f, fmt)
        except ImageReadError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ImageReadError(f"{label}: cannot read the image header; "
                                 f"{describe_error(e)}") from e
        if decode:
            f.seek(0)
            info["has_colour"] = _has_colour(f, label, info) if info["is_colour"] else False
        return info


def _pil_info(f: BinaryIO, fmt: str) -> dict[str, Any]:
    with Image.open(f, formats=[_PIL_FORMATS[fmt]]) as im:
        mode = im.mode
        depth = _declared_bit_depth(im, f, fmt)
        if depth is None:
            depth = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32,
                     "F": 32}.get(mode, 8)
        colour = _stored_in_colour(im)
        width, height = im.size
        # Pillow's PNG getexif() decodes the whole image unless eXIf came before the pixels.
        exif = im.getexif() if fmt != "png" or "exif" in im.info else {}
        if exif.get(0x0112, 1) in (5, 6, 7, 8):  # read_image turns these by 90 degrees
            width, height = height, width
        return {"format": fmt, "mode": mode, "width": width, "height": height,
                "bit_depth": depth, "is_colour": colour}


def _stored_in_colour(im: Image.Image) -> bool:
    """Stored with colour channels or a palette that is not all grey (from the header)."""
    if im.mode in ("P", "PA"):
        pal = np.asarray(im.getpalette("RGB") or [0, 0, 0]).reshape(-1, 3)
        return bool((pal.max(axis=1) != pal.min(axis=1)).any())
    return im.mode in _COLOUR_MODES


def _has_colour(f: BinaryIO, label: str, info: dict[str, Any]) -> bool:
    """`_shows_colour` of the file's pixels decoded in full; DICOM: as stored."""
    if info["format"] == "dicom":
        return bool(info["is_colour"])
    with _errors_described(label):
        with Image.open(f, formats=[_PIL_FORMATS[info["format"]]]) as im:
            plan = _Plan(im, info["format"], None)
            check_decoded(plan.decoded, label, plan.what)
            im.load()
            return _shows_colour(im)


def _shows_colour(im: Image.Image) -> bool:
    """More than 0.01% of a decoded image's pixels with a channel spread above 24/255.

    Grey radiographs saved as RGB JPEG differ between channels only by a few levels of
    chroma-rounding noise (never above 24 in the 2,300 of them in the real data set); a small
    coloured arrow on a 224 px image covers some tens of pixels.
    """
    # convert("RGB") of an RGB image is a copy of the same pixels: skip it.
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    # Channel by channel in uint8 (max >= min: no wrap-around), on Pillow's three contiguous
    # bands: max(axis=2) over a 3-wide axis cost 20 times the decode, strided views of one
    # array 1.7 times these, and the OOD flag's colour rule runs this on every colour file.
    r, g, b = (np.asarray(band) for band in rgb.split())
    spread = np.maximum(np.maximum(r, g), b)
    spread -= np.minimum(np.minimum(r, g), b)
    return bool(np.count_nonzero(spread > 24) > 0.0001 * spread.size)
