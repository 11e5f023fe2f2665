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
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((w, h), resample=_RESAMPLE[method]), dtype=np.float32)


def preprocess(image: np.ndarray, params: Preprocess) -> np.ndarray:
    """Intensity image (H, W) in [0, 1] -> network input (3, h, w) float32.

    Resize to the model's input size, replicate grey to three channels, normalise each channel
    with the model's mean/std.
    """
    if image.ndim != 2:
        raise ValueError(f"preprocess expects a 2-D intensity image, got shape {image.shape}")
    small = resize(image, params.input_size, params.resize)
    mean = np.asarray(params.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(params.std, dtype=np.float32)[:, None, None]
    return ((small[None, :, :] - mean) / std).astype(np.float32, copy=False)


def preprocess_batch(images: Sequence[np.ndarray], params: Preprocess) -> np.ndarray:
    """Several intensity images -> one NCHW float32 batch."""
    h, w = params.input_size
    out = np.empty((len(images), 3, h, w), dtype=np.float32)
    for i, img in enumerate(images):
        out[i] = preprocess(img, params)
    return out
