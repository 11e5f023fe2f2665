"""fxscore.scoring: streaming, order-preserving scoring with decoding overlapped."""
from __future__ import annotations

import os
import time
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
    """Each readable file scored on its own, as a batch of one, read by the one rule."""
    params = model.meta.preprocess
    return {name: float(model.predict(preprocess(read_image(path, min_size=params.input_size),
                                                 params)[None])[0])
            for name, path in mixed if "broken" not in str(path)}


@pytest.mark.parametrize("batch_size, workers", [(1, 1), (4, 3), (64, 2)])
def test_rows_in_input_order_with_errors_in_place(model, mixed, alone, batch_size, workers):
    rows = list(score_items(model, mixed, batch_size=batch_size, workers=workers))
    assert [r["path"] for r in rows] == [name for name, _ in mixed]
    broken = {name for name, _ in find_images(SAMPLE_DATA / "extras" / "broken")}
    for row, (name, path) in zip(rows, mixed):
        assert set(row) == {"path", "probability", "label", "threshold", "model_id", "sha256",
                            "error"}
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


@pytest.mark.parametrize("cpus, gated", [(2, True), (64, False)])
def test_decoding_waits_for_the_model_only_where_they_would_share_cpus(
        model, mixed, monkeypatch, cpus, gated):
    """The model (1 thread) and 2 decode threads on 2 CPUs: no file starts decoding while a
    batch runs; with CPUs to spare, decoding goes on beside the model. The rows are the same."""
    monkeypatch.setattr(scoring, "available_cpus", lambda: cpus)
    batches, starts = [], []
    score, open_regular = scoring._score, scoring.open_regular

    def slow_score(*args, **kwargs):
        t0 = time.perf_counter()
        time.sleep(0.03)  # a model batch long enough for decoders to show themselves
        try:
            return score(*args, **kwargs)
        finally:
            batches.append((t0, time.perf_counter()))

    def opened(path):
        starts.append(time.perf_counter())
        time.sleep(0.01)  # a decode slow enough to keep a backlog of files
        return open_regular(path)

    monkeypatch.setattr(scoring, "_score", slow_score)
    monkeypatch.setattr(scoring, "open_regular", opened)
    rows = list(score_items(model, mixed, batch_size=4, workers=2))
    assert len(rows) == len(mixed) and len(starts) == len(mixed)
    # a worker past the gate before it closed may open its file a moment after: 5 ms of grace
    during = sum(t0 + 0.005 < t < t1 for t in starts for t0, t1 in batches)
    assert (during == 0) == gated, f"{during} of {len(starts)} decodes began during a batch"


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
    monkeypatch.setattr(scoring, "read_image", lambda source, **kw: np.zeros((64, 64, 4), np.float32))
    [row] = score_items(model, [("a.png", tmp_path / "a.png")])
    assert row["probability"] is None
    assert row["error"].startswith(f"{tmp_path / 'a.png'}: ValueError: preprocess expects")


def test_empty_input(model):
    assert list(score_items(model, [])) == []


def test_bad_batch_size(model):
    with pytest.raises(ValueError, match="batch_size"):
        list(score_items(model, [], batch_size=0))


def test_rows_carry_the_sha256_of_the_bytes_scored(model, tmp_path):
    import hashlib

    a = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(a)
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    rows = list(score_items(model, [("a.png", a), ("bad.png", tmp_path / "bad.png"),
                                    ("gone.png", tmp_path / "gone.png")]))
    assert rows[0]["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest() and not rows[0]["error"]
    # read but not decodable: the hash of what was read; not readable at all: ""
    assert rows[1]["sha256"] == hashlib.sha256(b"not an image at all").hexdigest()
    assert rows[1]["error"] and rows[2]["error"] and rows[2]["sha256"] == ""


def test_each_file_is_opened_once_and_decoded_from_those_bytes(model, tmp_path, monkeypatch):
    """The hash and the decode see the same bytes: one open per file, decoding from memory,
    at reduced scale no smaller than the model's input size."""
    for i in range(5):
        Image.fromarray(np.full((64, 48), 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
    opened, decoded = [], []
    real_open, real_read = scoring.open_regular, scoring.read_image

    def counting_open(path):
        opened.append(Path(path).name)
        return real_open(path)

    def recording_read(source, **kw):
        decoded.append((type(source).__name__, kw.get("name"), kw.get("min_size")))
        return real_read(source, **kw)

    monkeypatch.setattr(scoring, "open_regular", counting_open)
    monkeypatch.setattr(scoring, "read_image", recording_read)
    items = [(f"{i}.png", tmp_path / f"{i}.png") for i in range(5)]
    rows = list(score_items(model, items, workers=2))
    assert all(not r["error"] for r in rows)
    assert sorted(opened) == [f"{i}.png" for i in range(5)]  # once each
    size = model.meta.preprocess.input_size
    assert sorted(decoded) == sorted(("BytesIO", str(p), size) for _, p in items)


def test_a_fifo_met_at_open_is_an_error_row_not_a_hang(model, tmp_path):
    """As if a listed file were replaced by a FIFO before the decoder got to it."""
    import threading

    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")
    items = [("a.png", tmp_path / "a.png"), ("b.png", tmp_path / "b.png"),
             ("c.png", tmp_path / "a.png")]
    rows: list = []
    t = threading.Thread(target=lambda: rows.extend(score_items(model, items)), daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "scoring blocks on a FIFO"
    assert [r["path"] for r in rows] == ["a.png", "b.png", "c.png"]
    assert "not a regular file" in rows[1]["error"] and rows[1]["sha256"] == ""
    assert not rows[0]["error"] and not rows[2]["error"]


def test_threshold_overrides_the_models(tmp_path):
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(tmp_path / "g.png")
    at = load_model(make_model(tmp_path / "a.onnx", make_meta(threshold=0.5), weight=0.0))
    [row] = score_items(at, [("g.png", tmp_path / "g.png")], threshold=0.7)
    assert (row["probability"], row["label"], row["threshold"]) == (0.5, "not fractured", 0.7)


# ---- the memory budget ------------------------------------------------------------------------

def test_budget_holds_what_fits_and_admits_an_oversized_request_alone():
    import threading

    budget = scoring.MemoryBudget(100)
    budget.acquire(60)
    got = []
    t = threading.Thread(target=lambda: (budget.acquire(50), got.append(50)), daemon=True)
    t.start()
    t.join(0.2)
    assert not got  # 60 + 50 > 100: waits
    budget.release(60)
    t.join(5)
    assert got == [50] and budget.in_use == 50
    budget.release(50)
    budget.acquire(1000)  # larger than the whole budget: admitted, because it is alone
    assert budget.in_use == 1000 and budget.peak == 1000
    late = threading.Thread(target=lambda: (budget.acquire(1), got.append(1)), daemon=True)
    late.start()
    late.join(0.2)
    assert got == [50]  # nothing joins an oversized decode
    budget.release(1000)
    late.join(5)
    assert got == [50, 1]


def test_budget_is_first_come_first_served():
    """A large request is not overtaken for ever by small ones arriving after it."""
    import threading
    import time

    budget = scoring.MemoryBudget(100)
    budget.acquire(50)
    order = []

    def take(n):
        budget.acquire(n)
        order.append(n)

    big = threading.Thread(target=take, args=(80,), daemon=True)
    big.start()
    time.sleep(0.1)  # the big one queues first
    small = threading.Thread(target=take, args=(10,), daemon=True)
    small.start()
    small.join(0.2)
    assert order == []  # 50 + 10 would fit, but the big request is ahead of it
    budget.release(50)
    big.join(5)
    small.join(5)
    assert order == [80, 10]


def test_closing_the_budget_wakes_waiters():
    import threading

    budget = scoring.MemoryBudget(10)
    budget.acquire(10)
    seen = []

    def wait():
        try:
            budget.acquire(5)
        except scoring.BudgetClosed:
            seen.append("closed")

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    budget.close()
    t.join(5)
    assert seen == ["closed"]


def test_decoding_stays_within_the_budget(model, tmp_path, monkeypatch):
    """With 4 workers and room for about two images, at most two are decoded at once, and an
    image larger than the whole budget is still scored (alone)."""
    import threading
    import time

    for i in range(8):
        Image.fromarray(np.full((200, 200), 10 * i, np.uint8)).save(tmp_path / f"{i}.png")
    Image.fromarray(np.full((6000, 6000), 200, np.uint8)).save(tmp_path / "huge.png")
    items = [(f"{i}.png", tmp_path / f"{i}.png") for i in range(8)]
    items.insert(4, ("huge.png", tmp_path / "huge.png"))

    def estimate(path: Path) -> int:
        with open(path, "rb") as f:
            return scoring.estimate_nbytes(f, path.stat().st_size, model.meta.preprocess.input_size)

    budget = scoring.MemoryBudget(int(2.5 * estimate(tmp_path / "0.png")))
    active, most = [0], [0]
    lock = threading.Lock()
    real_read = scoring.read_image

    def slow_read(source, **kw):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.05)
        try:
            return real_read(source, **kw)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(scoring, "read_image", slow_read)
    rows = list(score_items(model, items, batch_size=3, workers=4, memory=budget))
    assert [r["path"] for r in rows] == [name for name, _ in items]
    assert all(not r["error"] for r in rows)
    assert most[0] == 2
    huge = estimate(tmp_path / "huge.png")
    assert huge > budget.limit and budget.peak == huge  # admitted alone, never refused
    assert budget.in_use == 0


def _large_dicom(path: Path) -> Path:
    """A 2000 x 2500 12-bit DX image, uncompressed: 10 MB of pixels, 20 MB as float32."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", "MONOCHROME2", 1
    ds.Rows, ds.Columns = 2500, 2000
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = np.random.default_rng(0).integers(0, 4096, (2500, 2000), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("budget, reused", [(1 << 30, True), (16 << 20, False)])
def test_large_decodes_reuse_freed_memory_within_a_share_of_the_budget(model, tmp_path,
                                                                        budget, reused):
    """What a large decode frees is kept for the next one, up to `keep_per_arena` (a quarter of
    the budget over the workers): returning it each time made the next decode fault ~10,000
    pages back in (a 20 MB float image alone is 4,900). Under a budget too small to keep it,
    it is returned, and the page faults come back."""
    import resource

    path = _large_dicom(tmp_path / "big.dcm")
    memory = scoring.MemoryBudget(budget)
    scoring._tune_malloc(memory, 1)
    params = model.meta.preprocess
    assert not isinstance(scoring._load(path, params, memory).x, str)  # faults its pages in
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        assert not isinstance(scoring._load(path, params, memory).x, str)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
    assert (faults < 1000) == reused, f"{faults:.0f} page faults per file"


def test_estimate_counts_the_decoded_pixels(tmp_path):
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(tmp_path / "rgb.png")
    (tmp_path / "junk.png").write_bytes(b"x" * 1000)
    path = tmp_path / "rgb.png"
    with open(path, "rb") as f:
        n = scoring.estimate_nbytes(f, path.stat().st_size)
        assert f.tell() == 0  # ready for the read that follows
    assert n >= 300 * 400 * 3
    with open(tmp_path / "junk.png", "rb") as f:
        assert scoring.estimate_nbytes(f, 1000) == 1000 + int(
            scoring.DECODE_OVERHEAD * scoring.UNKNOWN_FACTOR * 1000) + scoring.PER_FILE


def test_model_input_is_the_one_reading_rule(model, tmp_path):
    """What score_items feeds the model: the reduced-scale read, the same for a path or bytes."""
    import io

    x = np.arange(2400, dtype=np.float32)
    Image.fromarray((np.add.outer(x, x[:1800]) % 256).astype(np.uint8)).save(tmp_path / "big.jpg")
    params = model.meta.preprocess
    expected = preprocess(read_image(tmp_path / "big.jpg", min_size=params.input_size), params)
    from_path = scoring.model_input(tmp_path / "big.jpg", params)
    from_bytes = scoring.model_input(io.BytesIO((tmp_path / "big.jpg").read_bytes()), params)
    assert np.array_equal(from_path, expected) and np.array_equal(from_bytes, expected)
    [row] = score_items(model, [("big.jpg", tmp_path / "big.jpg")])
    assert row["probability"] == pytest.approx(float(model.predict(expected[None])[0]), abs=1e-6)


@pytest.mark.parametrize("size, scored", [((1, 1), False), ((31, 400), False), ((400, 31), False),
                                          ((32, 32), True), ((32, 1000), True)])
def test_images_too_small_to_be_a_radiograph_are_error_rows(model, tmp_path, size, scored):
    """A 1 x 1 black image once scored 0.9998 "fractured": under 32 px a side is an error."""
    path = tmp_path / "tiny.png"
    Image.new("L", size, 0).save(path)
    [row] = score_items(model, [("tiny.png", path)], workers=1)
    if scored:
        assert row["error"] == "" and row["probability"] is not None
    else:
        assert row["probability"] is None and row["label"] == ""
        assert row["error"] == (f"{path}: {size[0]} x {size[1]} pixels is too small to be a "
                                "radiograph (fxscore scores images of at least 32 x 32 pixels)")
        assert row["sha256"]  # it was read: a fixed file is found by --retry-errors


def test_colour_images_are_flagged_ood_whatever_their_distance(tmp_path, monkeypatch):
    """The OOD flag's colour rule: a colour image's `ood` is true, its `ood_score` the
    distance; grey images (an RGB-stored grey one too) keep the threshold's verdict; error
    rows and models without OOD statistics are as before."""
    from onnx_models import make_convnet

    from fxscore import images, ood
    from fxscore.contract import Preprocess
    from fxscore.explain_graph import augment
    from fxscore.scoring import model_input

    meta = make_meta(preprocess=Preprocess(input_size=(32, 32)), model_name="test-cnn")
    source = make_convnet(tmp_path / "cnn.onnx", meta)
    plain = load_model(source)
    data, _ = augment(source.read_bytes(), plain.meta)
    path = tmp_path / "cnn.explain.onnx"
    path.write_bytes(data)
    rng = np.random.default_rng(0)
    fit = []
    for i in range(30):
        img = (rng.random((40, 40)) * 60 + 100).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / f"fit{i}.png")
        fit.append(tmp_path / f"fit{i}.png")
    ood.embed_ood(path, fit)
    model = load_model(path)
    grey = np.asarray(Image.open(fit[0]))
    rgb = np.stack([grey] * 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb-grey.png")
    # a coloured stroke of the same luma (BT.601): colour that the grey model input lacks
    v = rgb[10:14, 5:35, 0].astype(float)
    rgb[10:14, 5:35, 0] = np.round(v + 40)
    rgb[10:14, 5:35, 1] = np.round(v - 40 * 0.299 / 0.587)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    items = [(n, tmp_path / n) for n in ("colour.png", "rgb-grey.png", "fit0.png", "broken.png")]
    rows = {r["path"]: r for r in score_items(model, items, workers=2)}
    x = np.stack([model_input(tmp_path / n, model.meta.preprocess) for n, _ in items[:3]])
    distance = model.predict_with(x, ("ood_score",))["ood_score"]
    threshold = model.meta.ood["threshold"]
    assert distance[0] <= threshold  # flagged for its colour alone
    assert rows["colour.png"]["ood"] is True and rows["colour.png"]["_colour"] is True
    for j, name in enumerate(("colour.png", "rgb-grey.png", "fit0.png")):
        assert rows[name]["ood_score"] == pytest.approx(float(distance[j]), rel=1e-6)
    for name in ("rgb-grey.png", "fit0.png"):
        assert rows[name]["ood"] is (rows[name]["ood_score"] > threshold) is False
        assert "_colour" not in rows[name]
    assert rows["broken.png"]["error"] and rows["broken.png"]["ood"] is None
    # no OOD statistics: no check is made and no OOD cells are written
    monkeypatch.setattr(images, "_shows_colour", lambda *a: pytest.fail("colour checked"))
    for row in score_items(plain, items):
        assert "ood" not in row and "_colour" not in row


def test_a_too_small_compressed_dicom_is_an_error_row_from_its_decode_worker(model, tmp_path):
    """Compressed DICOM is decoded in a worker process (fxscore.isolate): the same 32 px rule."""
    from pydicom.uid import RLELossless

    from test_dicom import write_dicom

    path = write_dicom(tmp_path / "small.dcm", np.full((20, 40), 900, np.uint16))
    import pydicom

    ds = pydicom.dcmread(path)
    ds.compress(RLELossless, ds.pixel_array)
    ds.save_as(path, enforce_file_format=True)
    [row] = score_items(model, [("small.dcm", path)], workers=1)
    assert row["error"] == (f"{path}: 40 x 20 pixels is too small to be a radiograph (fxscore "
                            "scores images of at least 32 x 32 pixels)")
