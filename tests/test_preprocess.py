"""fxscore.preprocess: the one preprocessing definition, and its two fit rules."""
from __future__ import annotations

import numpy as np
import pytest

from fxscore.contract import Preprocess
from fxscore.preprocess import content_box, fit_to_input, preprocess, preprocess_batch

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
