"""What the network sees in training and in evaluation, side by side.

Evaluation is the scorer's own reading rule, imported: `preprocess(read_image(path,
min_size=input size))` (`fxscore.scoring.model_input`; `data.decode` reads every split so),
nothing else. Training augmentation only changes *which* pixels reach that same function: the seed's
RandomResizedCrop, RandomHorizontalFlip and RandomRotation(10), applied to the float intensity
image (so 16-bit and DICOM precision survives), then `preprocess` normalises it. The crop is
brought to the input size with the scorer's `fit_to_input` (stretched, or padded keeping its
aspect ratio), so training and serving share the fit rule and the resampling filter too.

Randomness comes from a numpy Generator the caller passes in, seeded per (view, image): the
augmented view of an image is a pure function of the seed, so runs repeat, resume exactly, and
do not depend on the number of DataLoader workers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fxscore.contract import Preprocess
from fxscore.preprocess import fit_to_input, float_image, preprocess, resize

# Training decodes each file once and keeps it in memory, shrunk so its shorter side is at most
# SHRINK_FACTOR x the input size. This is a training-speed measure only (real radiographs reach
# 3000x5800 and decoding them every epoch costs more than the network on a CPU). A crop covering
# 8% of the area -- RandomResizedCrop's smallest -- still has about 0.8x the input resolution,
# so augmented views lose almost nothing. Evaluation never uses the shrunk copy.
SHRINK_FACTOR = 2


def shrink_for_augmentation(image: np.ndarray, input_size: tuple[int, int],
                            method: str = "bilinear") -> np.ndarray:
    """Intensity image -> float16 copy whose shorter side is <= SHRINK_FACTOR * input size."""
    limit = SHRINK_FACTOR * max(input_size)
    h, w = image.shape
    scale = limit / min(h, w)
    if scale < 1:
        image = resize(image, (max(1, round(h * scale)), max(1, round(w * scale))), method)
    # float16 halves the memory; its 11-bit mantissa is finer than the augmentation's own noise.
    return image.astype(np.float16)


def random_resized_crop_box(shape: tuple[int, int], rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            ) -> tuple[int, int, int, int]:
    """(top, left, height, width), sampled as torchvision's RandomResizedCrop.get_params does."""
    height, width = shape
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback to a central crop with the aspect clamped into `ratio`.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class TrainPreset:
    """RandomResizedCrop -> fit to input -> RandomHorizontalFlip -> RandomRotation -> preprocess.

    With fit "pad" the crop keeps the image's aspect ratio (only its scale is random) and is
    padded as the whole image is; `ratio` applies to stretching models.
    """

    params: Preprocess
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    degrees: float = 10.0

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # A padding model sees every image at its own aspect ratio, so its crops keep that
        # ratio too: a crop of another ratio would be padded with black bands that no scored
        # image of that shape has (a square radiograph is never padded).
        aspect = image.shape[1] / image.shape[0]
        ratio = self.ratio if self.params.fit == "stretch" else (aspect, aspect)
        top, left, h, w = random_resized_crop_box(image.shape, rng, self.scale, ratio)
        x = fit_to_input(image[top:top + h, left:left + w], self.params)
        if rng.random() < self.hflip_prob:
            x = x[:, ::-1]
        angle = rng.uniform(-self.degrees, self.degrees)
        # Corners rotated in are filled with 0: black, the background of a radiograph.
        x = np.asarray(float_image(x).rotate(
            angle, resample=Image.Resampling.BILINEAR, fillcolor=0.0), dtype=np.float32)
        return preprocess(x, self.params)


@dataclass(frozen=True)
class EvalPreset:
    """Exactly what the scorer does to a decoded image."""

    params: Preprocess

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return preprocess(image, self.params)
