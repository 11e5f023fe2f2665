"""fxscore.train.engine: real learning, the run folder, checkpoints, resume, the feature cache."""
from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import fields
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torchvision.models import resnet18  # noqa: E402

from fxscore.contract import Preprocess  # noqa: E402
from fxscore.train.config import TrainConfig  # noqa: E402
from fxscore.train.engine import (HISTORY_FIELDS, RunError, fit, load_checkpoint,  # noqa: E402
                                  make_criterion)
from fxscore.train.model import build_model  # noqa: E402

pytestmark = pytest.mark.torch
SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "epoch", "best_epoch", "config",
                   "class_names", "positive_class", "preprocess", "metrics", "best_metrics",
                   "data_fingerprint", "versions"}
METRIC_KEYS = {"val_loss", "val_accuracy", "val_auc", "train_loss"}


def config(out: Path, **kw) -> TrainConfig:
    """Small and quick: 10 files per class and split, 32 px, one thread."""
    base = dict(data=str(SAMPLE), out=str(out), pretrained="none", freeze="backbone", epochs=2,
                batch_size=8, image_size=32, limit_per_class=10, threads=1, cache_views=2)
    return TrainConfig(**{**base, **kw})


def same_history(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k != "seconds"} == \
            {k: v for k, v in rb.items() if k != "seconds"}


def test_learns_from_random_init_on_sample_data(tmp_path):
    """Full fine-tuning from scratch on the synthetic phantoms: far better than chance.

    crop_scale 0.5: torchvision's 0.08 often crops the fracture out of a 64 px view, which is
    label noise that 8 epochs of 120 images cannot average away.
    """
    result = fit(config(tmp_path / "run", freeze="none", image_size=64, limit_per_class=None,
                        epochs=8, batch_size=16, patience=0, crop_scale=0.5))
    first, best = result.history[0], result.best_metrics
    assert best["val_loss"] < first["val_loss"] - 0.3
    assert best["val_auc"] >= 0.75
    assert result.test_metrics["test_auc"] >= 0.7


def test_run_folder_and_checkpoint_format(tmp_path):
    result = fit(config(tmp_path / "run"))
    out = result.out
    assert {p.name for p in out.iterdir()} == {"config.json", "data.csv", "history.csv",
                                              "train.log", "best.pt", "last.pt", "metrics.json"}
    doc = json.loads((out / "config.json").read_text())
    assert set(doc["config"]) == {f.name for f in fields(TrainConfig)}
    assert {"torch", "torchvision", "fxscore", "python", "numpy", "pillow"} <= set(doc["versions"])
    assert doc["files"] == {"train": 20, "val": 20, "test": 20}
    with (out / "data.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 60
    with (out / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == HISTORY_FIELDS and [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[1]["val_loss"]) == pytest.approx(result.history[1]["val_loss"])

    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(out / name, map_location="cpu", weights_only=True)
        assert CHECKPOINT_KEYS <= set(ckpt)
        assert ckpt["class_names"] == ["fractured", "not fractured"]
        assert ckpt["positive_class"] == "fractured"
        assert Preprocess.from_dict(ckpt["preprocess"]) == Preprocess(input_size=(32, 32),
                                                                      fit="pad")
        assert set(ckpt["metrics"]) == set(ckpt["best_metrics"]) == METRIC_KEYS
        assert {"torch", "torchvision", "fxscore", "python"} <= set(ckpt["versions"])
        assert ckpt["data_fingerprint"] == doc["data_fingerprint"]
        assert TrainConfig.from_dict(ckpt["config"]) == config(tmp_path / "run")
        model = build_model("none")  # how `fxscore export` rebuilds the network
        model.load_state_dict(ckpt["model"])
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 2 and last["metrics"]["val_loss"] == result.history[1]["val_loss"]
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == best["best_epoch"] == result.best_epoch
    assert best["best_metrics"]["val_loss"] == min(h["val_loss"] for h in result.history)


@pytest.mark.parametrize("freeze, ema", [("none", 0.0), ("backbone", 0.0), ("none", 0.9),
                                         ("backbone", 0.9)])
def test_resume_gives_the_uninterrupted_result(tmp_path, freeze, ema):
    whole = fit(config(tmp_path / "whole", freeze=freeze, epochs=3, ema=ema))

    def interrupt(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config(tmp_path / "cut", freeze=freeze, epochs=3, ema=ema), on_epoch=interrupt)
    resumed = fit(config(tmp_path / "cut", freeze=freeze, epochs=3, ema=ema), resume=True)
    same_history(resumed.history, whole.history)
    a, b = load_checkpoint(tmp_path / "whole/last.pt"), load_checkpoint(tmp_path / "cut/last.pt")
    for key in ("model", "train_model") if ema else ("model",):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    with (tmp_path / "cut/history.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]
    assert "resumed after epoch 2" in (tmp_path / "cut/train.log").read_text()


@pytest.mark.parametrize("freeze", ["none", "backbone"])
def test_weight_average_is_what_is_validated_and_kept(tmp_path, freeze):
    """With --ema the checkpoint's "model" is the average, not the optimizer's weights, and the
    history's validation loss is the average's: scoring best.pt reproduces it."""
    import numpy as np

    from fxscore.train.data import decode, discover, tensor_batches
    from fxscore.train.engine import evaluate
    from fxscore.train.presets import EvalPreset

    cfg = config(tmp_path / "run", freeze=freeze, epochs=2, ema=0.9, patience=0)
    result = fit(cfg)
    best = load_checkpoint(tmp_path / "run/best.pt")
    assert best["average_steps"] == best["epoch"] * math.ceil(20 / 8)  # 20 images, batches of 8
    trained = [k for k, v in best["train_model"].items() if v.is_floating_point()
               and not torch.equal(v, best["model"][k])]
    assert "fc.weight" in trained and (freeze == "backbone") == ("conv1.weight" not in trained)

    model = build_model("none")
    model.load_state_dict(best["model"])
    layout = discover(cfg.data, cfg.positive_class, cfg.limit_per_class, cfg.seed)
    params = Preprocess.from_dict(best["preprocess"])
    val = decode(layout.splits["val"], EvalPreset(params), 1, None, "val",
                 min_size=params.input_size)
    m, _ = evaluate(model, tensor_batches(torch.from_numpy(np.stack(val.arrays)), val.targets, 16),
                    torch.nn.BCEWithLogitsLoss(), torch.device("cpu"))
    assert m["loss"] == pytest.approx(result.best_metrics["val_loss"], abs=1e-5)


def test_cached_features_train_like_the_naive_loop(tmp_path):
    """One view, one epoch: the cache holds exactly the views the naive loop draws.

    The naive side augments in two DataLoader worker processes: views do not depend on them.
    """
    naive = fit(config(tmp_path / "naive", cache_views=0, epochs=1, workers=2))
    cached = fit(config(tmp_path / "cached", cache_views=1, epochs=1))
    for key in ("train_loss", "val_loss", "val_auc", "val_accuracy"):
        assert cached.history[0][key] == pytest.approx(naive.history[0][key], abs=1e-5)
    a = load_checkpoint(tmp_path / "naive/last.pt")["model"]
    b = load_checkpoint(tmp_path / "cached/last.pt")["model"]
    torch.testing.assert_close(a["fc.weight"], b["fc.weight"], rtol=1e-4, atol=1e-5)
    assert "feature cache: 1 views" in (tmp_path / "cached/train.log").read_text()


@pytest.mark.parametrize("cache_views", [0, 2])
def test_frozen_backbone_stays_exactly_as_loaded(tmp_path, cache_views):
    """A local state dict is the backbone, and freezing keeps it bit for bit (BatchNorm too)."""
    torch.manual_seed(5)
    weights = resnet18().state_dict()
    torch.save(weights, tmp_path / "r18.pth")
    fit(config(tmp_path / "run", pretrained=str(tmp_path / "r18.pth"), cache_views=cache_views))
    trained = load_checkpoint(tmp_path / "run/last.pt")["model"]
    for k, v in weights.items():
        if not k.startswith("fc."):
            assert torch.equal(trained[k], v), k
    assert not torch.equal(trained["fc.weight"], build_model("none").fc.weight)


def test_unreadable_files_are_skipped_and_reported(tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        shutil.copytree(SAMPLE / split, data / split)
    broken = sorted((SAMPLE / "extras" / "broken").iterdir())
    for i, p in enumerate(broken):
        shutil.copy(p, data / ("train" if i % 2 else "val") / "fractured" / p.name)
    result = fit(config(tmp_path / "run", data=str(data), limit_per_class=None, epochs=1,
                        cache_views=1))
    assert sorted(Path(p).name for p, _ in result.unreadable) == sorted(p.name for p in broken)
    log = (tmp_path / "run/train.log").read_text()
    for p in broken:
        assert f"skipped unreadable file: {data}" in log and p.name in log
    assert "train 120 images" in log and "val 40" in log
    listed = json.loads((tmp_path / "run/metrics.json").read_text())["unreadable"]
    # relative to the data root: the run folder names no place of the machine it ran on
    assert sorted(listed) == sorted(f"{'train' if i % 2 else 'val'}/fractured/{p.name}"
                                    for i, p in enumerate(broken))


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    # lr 0: the val loss never improves after epoch 1, so patience 2 stops after epoch 3.
    result = fit(config(tmp_path / "run", lr=0.0, epochs=10, patience=2))
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.best_epoch == 1 and "early stopping" in result.stop_reason
    assert load_checkpoint(tmp_path / "run/best.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "run/last.pt")["epoch"] == 3
    again = fit(config(tmp_path / "run", lr=0.0, epochs=10, patience=2), resume=True)
    assert len(again.history) == 3 and "early stopping" in again.stop_reason


def test_time_budget_stops_cleanly_and_resume_finishes(tmp_path):
    cut = fit(config(tmp_path / "run", epochs=3, max_minutes=1e-6))
    assert len(cut.history) == 1 and "--max-minutes" in cut.stop_reason
    assert (tmp_path / "run/best.pt").is_file()
    done = fit(config(tmp_path / "run", epochs=3), resume=True)
    assert [h["epoch"] for h in done.history] == [1, 2, 3]


def test_cosine_schedule_is_recorded(tmp_path):
    result = fit(config(tmp_path / "run", scheduler="cosine", epochs=3, lr=0.01, patience=0))
    expected = [0.01 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)]
    assert [h["lr"] for h in result.history] == pytest.approx(expected)


def test_pos_weight():
    targets = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert make_criterion("none", targets)[1] is None
    criterion, w = make_criterion("auto", targets)
    assert w == 3.0 and criterion.pos_weight.item() == 3.0
    assert make_criterion("0.5", targets)[1] == 0.5


def test_refusals(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(SAMPLE, data, ignore=shutil.ignore_patterns("extras"))
    fit(config(tmp_path / "run", data=str(data), epochs=1))
    with pytest.raises(RunError, match="already holds a run.*--resume"):
        fit(config(tmp_path / "run", data=str(data), epochs=1))
    with pytest.raises(RunError, match="cannot change --lr 0.001 -> 0.1"):
        fit(config(tmp_path / "run", data=str(data), epochs=2, lr=0.1), resume=True)
    for p in (data / "val" / "fractured").iterdir():
        p.write_bytes(p.read_bytes() + b"\0")  # still readable, no longer the same data
    with pytest.raises(RunError, match="differs from the data"):
        fit(config(tmp_path / "run", data=str(data), epochs=2), resume=True)
    with pytest.raises(RunError, match="nothing to resume"):
        fit(config(tmp_path / "new"), resume=True)
    if not torch.cuda.is_available():
        with pytest.raises(RunError, match="no CUDA device"):
            fit(config(tmp_path / "gpu", device="cuda"))
    assert not (tmp_path / "new").exists() and not (tmp_path / "gpu").exists()


@pytest.mark.realdata
def test_trains_on_a_slice_of_the_real_xrays(tmp_path, real_data_root):
    result = fit(config(tmp_path / "run", data=str(real_data_root), freeze="none",
                        image_size=64, limit_per_class=40, epochs=2, batch_size=16))
    assert len(result.history) == 2
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"])
               for h in result.history)
    log = (tmp_path / "run/train.log").read_text()
    assert f"{len(result.unreadable)} unreadable skipped" in log
    doc = json.loads((tmp_path / "run/config.json").read_text())
    assert doc["files"] == {"train": 80, "val": 80, "test": 80}


def test_every_split_is_read_as_the_scorer_reads(tmp_path, monkeypatch):
    """train/, val/ and test/ are decoded with the model's input size as min_size, the
    scorer's reading rule (reduced-scale decoding of large files)."""
    from fxscore.train import engine

    seen = []
    real = engine.decode

    def recording(samples, transform, *args, **kw):
        seen.append((args[2] if len(args) > 2 else kw.get("label"), kw.get("min_size")))
        return real(samples, transform, *args, **kw)

    monkeypatch.setattr(engine, "decode", recording)
    fit(config(tmp_path / "run", epochs=1, limit_per_class=4))
    assert sorted(seen) == [("decode test", (32, 32)), ("decode train", (32, 32)),
                            ("decode val", (32, 32))]


@pytest.mark.parametrize("name", [b"\xff\xfe-not-utf8.png", b"=HYPERLINK(1).png"])
def test_odd_file_names_are_written_to_data_csv_as_fxscore_writes_csv(tmp_path, name):
    """A file name that is not UTF-8 (or looks like a formula) neither crashes the run nor
    reaches data.csv raw: it is written and read back through fxscore.csvsafe."""
    import os

    from fxscore import csvsafe

    data = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("fractured", "not fractured"):
            files = sorted((SAMPLE / split / cls).iterdir())[:4]
            (data / split / cls).mkdir(parents=True)
            for f in files:
                shutil.copy(f, data / split / cls / f.name)
    odd = os.fsdecode(name)
    victim = next((data / "train" / "fractured").iterdir())
    victim.rename(victim.with_name(odd))
    result = fit(config(tmp_path / "run", data=str(data), epochs=1, limit_per_class=None))
    with (result.out / "data.csv").open(newline="", encoding="utf-8") as f:
        files = [r["file"] for r in csvsafe.read_dicts(f)]
    assert f"train/fractured/{odd}" in files and len(files) == 16
