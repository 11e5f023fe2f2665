"""fxscore.preprocess: the one preprocessing definition, and its two fit rules."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fxscore.contract import Preprocess
from fxscore.preprocess import (_RESAMPLE, _maps_floats, content_box, fit_to_input, float_image,
                                preprocess, preprocess_batch, resize)

PAD = Preprocess(input_size=(64, 64), fit="pad")
STRETCH = Preprocess(input_size=(64, 64))


@pytest.mark.parametrize("shape, box", [
    ((100, 200), (16, 0, 32, 64)),   # landscape: black bands above and below
    ((300, 100), (0, 21, 64, 21)),   # portrait: 64 * 100 / 300 = 21.3 -> 21 wide, centred
    ((50, 50), (0, 0, 64, 64)),      # square: fills the input, as stretch does
    ((32, 4000), (31, 0, 1, 64)),    # extreme aspect: never less than one row
])
def test_content_box_keeps_the_aspect_ratio(shape, box):
    assert content_box(shape, PAD) == box
    assert content_box(shape, STRETCH) == (0, 0, 64, 64)


def test_pad_puts_the_whole_image_undistorted_on_black():
    # A bright disc on a landscape image stays a disc (not an ellipse) and the bands are black.
    yy, xx = np.mgrid[:100, :200]
    image = ((yy - 50) ** 2 + (xx - 100) ** 2 < 40 ** 2).astype(np.float32)
    out = fit_to_input(image, PAD)
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert np.all(out[:16] == 0) and np.all(out[48:] == 0)
    rows, cols = np.nonzero(out > 0.5)
    assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1
    stretched = fit_to_input(image, STRETCH)
    rows, cols = np.nonzero(stretched > 0.5)
    assert (rows.max() - rows.min()) > 1.6 * (cols.max() - cols.min())  # squashed sideways


def test_preprocess_normalises_the_padding_as_black():
    image = np.ones((100, 200), dtype=np.float32)
    x = preprocess(image, PAD)
    mean, std = np.array(PAD.mean)[:, None], np.array(PAD.std)[:, None]
    assert np.allclose(x[:, 0, :], (0 - mean) / std, atol=1e-6)
    assert np.allclose(x[:, 32, :], (1 - mean) / std, atol=1e-6)
    assert np.array_equal(preprocess_batch([image, image], PAD)[1], x)


def test_square_images_are_the_same_under_both_rules():
    rng = np.random.default_rng(0)
    image = rng.random((90, 90)).astype(np.float32)
    assert np.array_equal(preprocess(image, PAD), preprocess(image, STRETCH))


def test_a_colour_or_batch_array_is_refused():
    with pytest.raises(ValueError, match="2-D intensity image"):
        preprocess(np.zeros((10, 10, 3), dtype=np.float32), PAD)


@pytest.mark.parametrize("shape, size", [((2500, 2000), (224, 224)), ((7, 5), (3, 9)),
                                         ((224, 300), (128, 128)), ((1, 600), (224, 224))])
@pytest.mark.parametrize("method", ["bilinear", "bicubic", "lanczos"])
def test_resize_reads_the_array_in_place_with_the_copys_result(shape, size, method):
    assert _maps_floats(), "this Pillow's map_buffer no longer maps mode F: resize copies again"
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    mapped = float_image(image)
    image[0, 0] = 2.0  # the image is the array's memory, not a copy of it
    assert mapped.getpixel((0, 0)) == 2.0 and mapped.readonly
    copied = Image.fromarray(image, mode="F").resize(size[::-1], resample=_RESAMPLE[method])
    assert np.array_equal(resize(image, size, method), np.asarray(copied))


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float64).reshape(4, 6) / 7,          # float64: converted
    (np.arange(24, dtype=np.float32).reshape(6, 4) / 7).T,      # transposed view
    (np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7)[1, :, 1:],  # strided view
])
@pytest.mark.parametrize("maps", [True, False])
def test_any_2d_array_becomes_its_float32_values(array, maps, monkeypatch):
    from fxscore import preprocess as module

    monkeypatch.setattr(module, "_MAPS_FLOATS", maps)  # False: a Pillow that cannot map F
    im = module.float_image(array)
    assert im.mode == "F" and im.size == array.shape[::-1]
    assert np.array_equal(np.asarray(im), array.astype(np.float32))
