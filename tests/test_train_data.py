"""fxscore.train.data: layout checks, fingerprint, the decode pass, keyed augmentation views."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fxscore.contract import Preprocess  # noqa: E402
from fxscore.images import read_image  # noqa: E402
from fxscore.preprocess import preprocess  # noqa: E402
from fxscore.train.data import (DataError, EpochBatches, TrainViews, chunks, decode,  # noqa: E402
                                Sample, discover, epoch_order, fingerprint)
from fxscore.train.presets import EvalPreset, TrainPreset  # noqa: E402

pytestmark = pytest.mark.torch
SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
CLASSES = ("fractured", "not fractured")


@pytest.fixture
def data(tmp_path) -> Path:
    """A writable copy of sample_data's labelled splits."""
    root = tmp_path / "data"
    for split in ("train", "val", "test"):
        shutil.copytree(SAMPLE / split, root / split)
    return root


def test_discover_sample_data():
    layout = discover(SAMPLE)
    assert layout.class_names == CLASSES and layout.positive_class == "fractured"
    assert {s: len(v) for s, v in layout.splits.items()} == {"train": 120, "val": 40, "test": 40}
    for samples in layout.splits.values():
        assert all(s.target == (s.path.parent.name == "fractured") for s in samples)
    other = discover(SAMPLE, positive_class="not fractured")
    assert sum(s.target for s in other.splits["train"]) == 60
    assert other.splits["train"][0].target == 0  # fractured/ sorts first, now negative


def _no_val(root: Path) -> None:
    shutil.rmtree(root / "val")


def _val_class_missing(root: Path) -> None:
    shutil.rmtree(root / "val" / "not fractured")


def _third_class(root: Path) -> None:
    (root / "train" / "unsure").mkdir()


def _empty_class(root: Path) -> None:
    for p in (root / "val" / "fractured").iterdir():
        p.unlink()


def _only_text(root: Path) -> None:
    for p in (root / "train" / "fractured").iterdir():
        p.unlink()
    (root / "train" / "fractured" / "notes.txt").write_text("not an image")


@pytest.mark.parametrize("breakage, words", [
    (_no_val, ["missing val/", "train/", "one folder per class"]),
    (_val_class_missing, ["val", "missing ['not fractured']"]),
    (_third_class, ["found 3 class folders", "exactly 2"]),
    (_empty_class, ["val/fractured", "no files"]),
    (_only_text, ["train/fractured", "no files"]),
])
def test_discover_names_what_is_expected(data, breakage, words):
    breakage(data)
    with pytest.raises(DataError) as e:
        discover(data)
    for w in words:
        assert w in str(e.value)


def test_discover_errors_for_missing_root_and_positive_class(tmp_path):
    with pytest.raises(DataError, match="no such folder.*train/"):
        discover(tmp_path / "nothing")
    with pytest.raises(DataError, match="positive class 'broken'.*--positive-class"):
        discover(SAMPLE, positive_class="broken")


def test_test_split_is_optional_and_other_files_are_ignored(data):
    shutil.rmtree(data / "test")
    (data / "train" / "fractured" / "README.txt").write_text("labels by Dr X")
    layout = discover(data)
    assert set(layout.splits) == {"train", "val"} and layout.ignored == 1


def test_limit_per_class_is_a_seeded_sample():
    a = discover(SAMPLE, limit_per_class=7, seed=1)
    assert len(a.splits["train"]) == 14 and len(a.splits["val"]) == 14
    assert a.splits == discover(SAMPLE, limit_per_class=7, seed=1).splits
    assert a.splits["train"] != discover(SAMPLE, limit_per_class=7, seed=2).splits["train"]


def test_fingerprint_follows_names_and_content(data):
    digest, rows = fingerprint(discover(data))
    assert len(rows) == 200 and {"file", "split", "target", "bytes", "sha256"} <= set(rows[0])
    assert fingerprint(discover(data))[0] == digest
    victim = sorted((data / "val" / "fractured").iterdir())[0]
    content = victim.read_bytes()
    victim.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))  # same name and size
    changed = fingerprint(discover(data))[0]
    assert changed != digest
    victim.rename(victim.with_name("renamed" + victim.suffix))
    assert fingerprint(discover(data))[0] not in (digest, changed)


def test_decode_skips_and_reports_unreadable_files(data):
    for p in (SAMPLE / "extras" / "broken").iterdir():
        shutil.copy(p, data / "val" / "fractured" / p.name)
    samples = discover(data).splits["val"]
    params = Preprocess(input_size=(64, 64))
    seen = []
    out = decode(samples, EvalPreset(params), threads=2,
                 progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert sorted(p.name for p, _ in out.failures) == ["empty.jpg", "not_an_image.png",
                                                      "truncated.png"]
    assert all(p.name in reason for p, reason in out.failures)
    assert len(out.samples) == len(out.arrays) == 40
    assert seen[-1] == ("decode", 43, 43)
    # The evaluation tensors are exactly the scorer's: read_image + preprocess, full resolution.
    for s, a in zip(out.samples, out.arrays, strict=True):
        np.testing.assert_array_equal(a, preprocess(read_image(s.path), params))
    assert out.targets.tolist() == [s.target for s in out.samples]


def test_epoch_order_and_batches():
    a, b = epoch_order(50, seed=0, epoch=1), epoch_order(50, seed=0, epoch=2)
    assert sorted(a.tolist()) == list(range(50)) and a.tolist() != b.tolist()
    assert epoch_order(50, seed=0, epoch=1).tolist() == a.tolist()
    assert epoch_order(50, seed=1, epoch=1).tolist() != a.tolist()
    assert [len(c) for c in chunks(range(33), 8)] == [8, 8, 8, 8]  # a lone sample breaks BN
    assert [len(c) for c in chunks(range(33), 8, training=False)] == [8, 8, 8, 8, 1]
    sampler = EpochBatches(50, 16, seed=0)
    sampler.set_epoch(3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4
    assert [i for batch in batches for _, i in batch] == epoch_order(50, 0, 3).tolist()
    assert {v for batch in batches for v, _ in batch} == {2}  # epoch e draws view e - 1


def test_train_views_are_keyed_not_stateful():
    samples = discover(SAMPLE, limit_per_class=4).splits["train"]
    params = Preprocess(input_size=(64, 64))
    decoded = decode(samples, lambda im: im.astype(np.float16))
    views = TrainViews(decoded.arrays, decoded.targets, TrainPreset(params), seed=3)
    x, y = views[(0, 5)]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y == samples[5].target
    torch.testing.assert_close(views[(0, 5)][0], x)
    assert not torch.equal(views[(1, 5)][0], x)
    # Worker processes draw the same views as the main process: nothing depends on process RNG.
    sampler = EpochBatches(len(views), 3, seed=0)
    inline = [b[0] for b in torch.utils.data.DataLoader(views, batch_sampler=sampler)]
    forked = [b[0] for b in torch.utils.data.DataLoader(views, batch_sampler=sampler,
                                                         num_workers=2)]
    for a, b in zip(inline, forked, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_decode_reads_as_the_scorer_reads(tmp_path):
    """With the input size, a large JPEG is decoded at reduced scale exactly as the scorer's
    `model_input` decodes it (no train/serve skew); without it, in full, which differs."""
    from PIL import Image

    from fxscore.scoring import model_input

    rng = np.random.default_rng(0)
    texture = (rng.random((1600, 1200)) * 255).astype(np.uint8)
    path = tmp_path / "data" / "val" / "fractured" / "big.jpg"
    path.parent.mkdir(parents=True)
    Image.fromarray(texture).save(path, quality=90)
    params = Preprocess(input_size=(64, 64))
    samples = [Sample(path, 1)]
    [scorer_like] = decode(samples, EvalPreset(params), min_size=params.input_size).arrays
    np.testing.assert_array_equal(scorer_like, model_input(path, params))
    [full] = decode(samples, EvalPreset(params)).arrays
    assert not np.array_equal(full, scorer_like)
