"""The ONE preprocessing definition, shared by training evaluation and the scorer.

Train/serve skew is the most common bug in deployed imaging models, so there is exactly one
function that turns an intensity image into the network's input. `fxscore.train` imports it
(augmentation only changes *which* pixels reach it: a crop, a flip, a rotation), and the scorer
calls it with the parameters embedded in the model file.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .contract import Preprocess

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "lanczos": Image.Resampling.LANCZOS}


def resize(image: np.ndarray, size: tuple[int, int], method: str = "bilinear") -> np.ndarray:
    """Resize a 2-D float image to (height, width), antialiased when shrinking.

    Pillow's resampling on 32-bit float images widens the filter support by the scale factor,
    which is the antialiasing that keeps large radiographs from aliasing into moire at 224 px.
    """
    h, w = size
    if image.shape == (h, w):
        return np.ascontiguousarray(image, dtype=np.float32)
    pil = float_image(image)
    return np.asarray(pil.resize((w, h), resample=_RESAMPLE[method]), dtype=np.float32)


def float_image(array: np.ndarray) -> Image.Image:
    """A 2-D array -> a read-only mode "F" Pillow image of its float32 values, over the
    array's own memory when it is C-contiguous float32 already.

    Image.fromarray copies mode F (Pillow maps only 8-bit, 16-bit and 4-byte-pixel modes),
    4 ms for a 2000 x 2500 image, a third of its resize. Pillow's own frombuffer maps the
    others with the call used here; where that call is missing or gives something else (the
    check below runs once a process), the copy it is.
    """
    array = np.ascontiguousarray(array, dtype=np.float32)
    if _maps_floats():
        try:
            return _mapped(array)
        except Exception:  # noqa: BLE001 - a shape the mapping refuses: copy it instead
            pass
    return Image.fromarray(array, mode="F")


def _mapped(array: np.ndarray) -> Image.Image:
    """A C-contiguous float32 array (float_image's, the probe's) mapped as mode F."""
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {array.shape}")
    height, width = array.shape
    im = Image.new("F", (0, 0))._new(Image.core.map_buffer(array, (width, height), "raw", 0,
                                                          ("F", 0, 1)))
    im.readonly = 1  # Pillow copies before any change: the array is never written through it
    return im


_MAPS_FLOATS: bool | None = None


def _maps_floats() -> bool:
    """Whether this Pillow maps a float32 array as the image fromarray would copy."""
    global _MAPS_FLOATS
    if _MAPS_FLOATS is None:
        probe = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
        try:
            im = _mapped(probe)
            _MAPS_FLOATS = (im.mode, im.size) == ("F", (4, 3)) and (
                im.tobytes() == Image.fromarray(probe, mode="F").tobytes())
        except Exception:  # noqa: BLE001 - an internal call of Pillow's: absent, or changed
            _MAPS_FLOATS = False
    return _MAPS_FLOATS


def content_box(shape: tuple[int, int], params: Preprocess) -> tuple[int, int, int, int]:
    """Where an image of `shape` lands in the network input: (top, left, height, width).

    "stretch" fills the input; "pad" scales the image to fit inside it, aspect ratio kept, and
    centres it (the rest is black). Heatmaps use the same box to map cells back to the image.
    """
    h_in, w_in = params.input_size
    if params.fit == "stretch":
        return 0, 0, h_in, w_in
    h, w = shape
    scale = min(h_in / h, w_in / w)
    h_out = min(h_in, max(1, round(h * scale)))
    w_out = min(w_in, max(1, round(w * scale)))
    return (h_in - h_out) // 2, (w_in - w_out) // 2, h_out, w_out


def fit_to_input(image: np.ndarray, params: Preprocess) -> np.ndarray:
    """A 2-D intensity image -> (h, w) float32 at the model's input size, by its `fit` rule.

    Padding is 0, black, the background of a radiograph (MONOCHROME1 is inverted on reading,
    so 0 is black for every image that reaches here). Training crops go through this function
    too, so a padded model learns on padded views.
    """
    top, left, h, w = content_box(image.shape, params)
    if (h, w) == params.input_size:
        return resize(image, params.input_size, params.resize)
    out = np.zeros(params.input_size, dtype=np.float32)
    out[top:top + h, left:left + w] = resize(image, (h, w), params.resize)
    return out


def preprocess(image: np.ndarray, params: Preprocess) -> np.ndarray:
    """Intensity image (H, W) in [0, 1] -> network input (3, h, w) float32.

    Bring it to the model's input size by its fit rule (stretch, or pad keeping the aspect
    ratio), replicate grey to three channels, normalise each channel with the model's mean/std.
    """
    if image.ndim != 2:
        raise ValueError(f"preprocess expects a 2-D intensity image, got shape {image.shape}")
    small = fit_to_input(image, params)
    mean = np.asarray(params.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(params.std, dtype=np.float32)[:, None, None]
    # One new array, divided in place: a second temporary of this size cost 8x the arithmetic
    # (fresh memory each call); the values are the same operations, bit for bit.
    out = np.subtract(small[None, :, :], mean, dtype=np.float32)
    return np.divide(out, std, out=out)


def preprocess_batch(images: Sequence[np.ndarray], params: Preprocess) -> np.ndarray:
    """Several intensity images -> one NCHW float32 batch."""
    h, w = params.input_size
    out = np.empty((len(images), 3, h, w), dtype=np.float32)
    for i, img in enumerate(images):
        out[i] = preprocess(img, params)
    return out
