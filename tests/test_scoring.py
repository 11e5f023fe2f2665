"""fxscore.scoring: streaming, order-preserving scoring with decoding overlapped."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fxscore import scoring
from fxscore.files import find_images
from fxscore.images import read_image
from fxscore.model import load_model
from fxscore.preprocess import preprocess
from fxscore.scoring import score_batches, score_items

from conftest import SAMPLE_DATA
from onnx_models import make_meta, make_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(make_model(tmp_path_factory.mktemp("m") / "m.onnx"), threads=1)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> list[tuple[str, Path]]:
    """Real phantoms (all formats of the test split) with broken files in between."""
    items = list(find_images(SAMPLE_DATA / "test"))
    broken = list(find_images(SAMPLE_DATA / "extras" / "broken"))
    assert len(items) >= 30 and len(broken) == 3
    for i, item in enumerate(broken):
        items.insert(7 * i + 3, item)
    return items


@pytest.fixture(scope="module")
def alone(model, mixed) -> dict[str, float]:
    """Each readable file scored on its own, as a batch of one."""
    params = model.meta.preprocess
    return {name: float(model.predict(preprocess(read_image(path), params)[None])[0])
            for name, path in mixed if "broken" not in str(path)}


@pytest.mark.parametrize("batch_size, workers", [(1, 1), (4, 3), (64, 2)])
def test_rows_in_input_order_with_errors_in_place(model, mixed, alone, batch_size, workers):
    rows = list(score_items(model, mixed, batch_size=batch_size, workers=workers))
    assert [r["path"] for r in rows] == [name for name, _ in mixed]
    broken = {name for name, _ in find_images(SAMPLE_DATA / "extras" / "broken")}
    for row, (name, path) in zip(rows, mixed):
        assert set(row) == {"path", "probability", "label", "threshold", "model_id", "error"}
        assert row["model_id"] == model.model_id and row["threshold"] == 0.5
        if name in broken:
            assert row["probability"] is None and row["label"] == ""
            assert str(path) in row["error"] and "\n" not in row["error"]
        else:
            assert row["error"] == ""
            # the same number as scoring the file alone, whatever the batch it landed in
            assert row["probability"] == pytest.approx(alone[name], abs=1e-6)
            assert row["label"] == ("fractured" if row["probability"] >= 0.5 else "not fractured")


def test_batches_are_model_batches(model, mixed):
    sizes = [len(rows) for rows in score_batches(model, mixed, batch_size=8)]
    assert sizes == [8] * (len(mixed) // 8) + ([len(mixed) % 8] if len(mixed) % 8 else [])


def test_reads_ahead_only_a_bounded_number_of_files(model, tmp_path):
    """Memory stays flat: the pipeline pulls at most (prefetch + 1) batches ahead."""
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(tmp_path / "g.png")
    pulled = 0

    def endless():
        nonlocal pulled
        while True:
            pulled += 1
            yield f"{pulled}.png", tmp_path / "g.png"

    rows = score_batches(model, endless(), batch_size=4, workers=2, prefetch=2)
    for _ in range(3):
        assert len(next(rows)) == 4
    # three batches delivered, the fourth being decoded, two more queued behind it
    assert pulled <= 4 * 3 + 4 * 3
    rows.close()  # an abandoned run stops cleanly


def test_label_uses_the_model_threshold(tmp_path):
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(tmp_path / "g.png")
    items = [("g.png", tmp_path / "g.png")]
    # weight 0, bias 0: the probability is exactly 0.5 whatever the image
    at = load_model(make_model(tmp_path / "a.onnx", make_meta(threshold=0.5), weight=0.0))
    above = load_model(make_model(tmp_path / "b.onnx", make_meta(threshold=0.6), weight=0.0))
    [row] = score_items(at, items)
    assert (row["probability"], row["label"], row["threshold"]) == (0.5, "fractured", 0.5)
    [row] = score_items(above, items)
    assert (row["probability"], row["label"], row["threshold"]) == (0.5, "not fractured", 0.6)


def test_unexpected_decoder_failure_is_an_error_row(model, tmp_path, monkeypatch):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(scoring, "read_image", lambda p: np.zeros((4, 4, 4), np.float32))
    [row] = score_items(model, [("a.png", tmp_path / "a.png")])
    assert row["probability"] is None
    assert row["error"].startswith(f"{tmp_path / 'a.png'}: ValueError: preprocess expects")


def test_empty_input(model):
    assert list(score_items(model, [])) == []


def test_bad_batch_size(model):
    with pytest.raises(ValueError, match="batch_size"):
        list(score_items(model, [], batch_size=0))
