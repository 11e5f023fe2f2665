"""fxscore.train.presets: augmentation feeds the scorer's own preprocess; eval IS the scorer's path.

Torch-free on purpose (presets needs only numpy and Pillow), so it runs in the scorer-only CI.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fxscore.contract import Preprocess
from fxscore.images import read_image
from fxscore.preprocess import preprocess
from fxscore.train.presets import (SHRINK_FACTOR, EvalPreset, TrainPreset, random_resized_crop_box,
                                   shrink_for_augmentation)

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
PARAMS = Preprocess(input_size=(64, 64))


def sample_files() -> list[Path]:
    """One file of every format in sample_data's class folders (JPEG, PNG, 16-bit, TIFF, DICOM)."""
    by_suffix: dict[str, Path] = {}
    for split in ("train", "val", "test"):
        for p in sorted((SAMPLE / split).glob("*/*")):
            by_suffix.setdefault(p.suffix.lower(), p)
    return list(by_suffix.values())


@pytest.fixture
def phantom() -> np.ndarray:
    return read_image(sample_files()[0])


@pytest.mark.parametrize("path", sample_files(), ids=lambda p: p.suffix)
def test_eval_preset_is_the_scorers_preprocessing(path: Path):
    assert len(sample_files()) >= 4, "sample_data should hold several formats"
    params = Preprocess(input_size=(224, 224))
    out = EvalPreset(params)(read_image(path))
    np.testing.assert_array_equal(out, preprocess(read_image(path), params))


def test_train_preset_without_randomness_equals_preprocess(phantom):
    h, w = phantom.shape
    # Full-image crop, no flip, no rotation: only the shared preprocessing is left.
    identity = TrainPreset(PARAMS, scale=(1.0, 1.0), ratio=(w / h, w / h), hflip_prob=0.0,
                           degrees=0.0)
    np.testing.assert_array_equal(identity(phantom, np.random.default_rng(0)),
                                  preprocess(phantom, PARAMS))
    flipped = TrainPreset(PARAMS, scale=(1.0, 1.0), ratio=(w / h, w / h), hflip_prob=1.0,
                          degrees=0.0)
    np.testing.assert_allclose(flipped(phantom, np.random.default_rng(0)),
                               preprocess(phantom, PARAMS)[:, :, ::-1], atol=1e-6)


@pytest.mark.parametrize("fit", ["pad", "stretch"])
def test_a_full_view_of_a_landscape_image_is_what_the_scorer_sees(fit):
    # The crop goes through the scorer's fit rule: a padding model trains on padded views.
    params = Preprocess(input_size=(64, 64), fit=fit)
    image = np.ones((50, 100), np.float32)
    identity = TrainPreset(params, scale=(1.0, 1.0), ratio=(2.0, 2.0), hflip_prob=0.0,
                           degrees=0.0)
    out = identity(image, np.random.default_rng(0))
    np.testing.assert_array_equal(out, preprocess(image, params))
    grey = out[0] * params.std[0] + params.mean[0]
    assert (grey[0, 32] == pytest.approx(0.0, abs=1e-5)) == (fit == "pad")  # a black band


def test_a_padding_models_crops_keep_the_images_aspect_ratio():
    # Eval pads a square image not at all: its training crops must not bring black bands in.
    params = Preprocess(input_size=(64, 64), fit="pad")
    white = np.ones((200, 200), np.float32)
    for seed in range(20):
        out = TrainPreset(params, degrees=0.0)(white, np.random.default_rng(seed))
        grey = out[0] * params.std[0] + params.mean[0]
        assert grey.min() == pytest.approx(1.0, abs=1e-5), seed


def test_train_preset_is_a_function_of_its_generator(phantom):
    preset = TrainPreset(PARAMS)
    a = preset(phantom, np.random.default_rng([7, 0, 3]))
    b = preset(phantom, np.random.default_rng([7, 0, 3]))
    c = preset(phantom, np.random.default_rng([7, 1, 3]))
    assert a.shape == (3, 64, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.05
    # Normalised like the scorer: every channel is (grey - mean) / std of the same grey image.
    grey = a * np.asarray(PARAMS.std)[:, None, None] + np.asarray(PARAMS.mean)[:, None, None]
    np.testing.assert_allclose(grey[0], grey[1], atol=1e-5)


def test_rotation_fills_with_black():
    white = np.ones((64, 64), np.float32)
    out = TrainPreset(PARAMS, scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=10.0)(
        white, np.random.default_rng(1))
    grey = out[0] * PARAMS.std[0] + PARAMS.mean[0]
    assert grey[32, 32] == pytest.approx(1.0, abs=1e-5)
    assert min(grey[0, 0], grey[0, -1], grey[-1, 0], grey[-1, -1]) < 0.5


@pytest.mark.parametrize("shape", [(224, 224), (100, 600), (3000, 1500), (40, 30)])
def test_crop_box_follows_torchvision_rules(shape):
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(shape, rng)
        assert 0 <= top and top + h <= shape[0] and 0 <= left and left + w <= shape[1]
        assert h > 0 and w > 0


def test_crop_box_scale_and_ratio():
    rng = np.random.default_rng(0)
    boxes = [random_resized_crop_box((400, 400), rng, scale=(0.25, 0.5)) for _ in range(200)]
    fractions = [h * w / 400 ** 2 for _, _, h, w in boxes]
    ratios = [w / h for _, _, h, w in boxes]
    assert 0.23 <= min(fractions) and max(fractions) <= 0.52
    assert 3 / 4 - 0.02 <= min(ratios) and max(ratios) <= 4 / 3 + 0.02
    # Impossible demands (a whole, square crop of a strip) fall back to a central crop.
    assert random_resized_crop_box((10, 1000), rng, scale=(0.99, 1.0)) == (0, 493, 10, 13)


def test_shrink_keeps_detail_for_the_smallest_crops():
    big = np.random.default_rng(0).random((3000, 1500), dtype=np.float32)
    small = shrink_for_augmentation(big, (64, 64))
    assert small.dtype == np.float16
    assert min(small.shape) == SHRINK_FACTOR * 64 and small.shape == (256, 128)
    little = np.random.default_rng(0).random((100, 90), dtype=np.float32)
    np.testing.assert_allclose(shrink_for_augmentation(little, (64, 64)), little, atol=1e-3)
