"""Reading any X-ray a hospital has into one intensity image in [0, 1].

PROVISIONAL minimal version; the full reader (DICOM, 16-bit, every PIL mode, EXIF) replaces it.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


class ImageReadError(Exception):
    """A file could not be read as an image; the message names the file and the reason."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file -> float32 array (H, W) with values in [0, 1]."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(f"{path}: {e}") from e
