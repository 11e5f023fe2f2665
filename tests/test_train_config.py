"""fxscore.train.config: option checks and what a resumed run may change. Torch-free."""
from __future__ import annotations

import pytest

from fxscore.train.config import RESUMABLE, TrainConfig, resumed_config

BASE = {"data": "data", "out": "runs/r18"}


@pytest.mark.parametrize("change, words", [
    ({"freeze": "head"}, "freeze must be"),
    ({"scheduler": "step"}, "scheduler must be"),
    ({"device": "tpu"}, "device must be"),
    ({"pos_weight": "heavy"}, "pos_weight must be"),
    ({"pos_weight": "-2"}, "pos_weight must be"),
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"image_size": 16}, "image_size must be at least 32"),
    ({"cache_views": -1}, "cache_views must not be negative"),
    ({"crop_scale": 0.0}, "crop_scale"),
    ({"ema": 1.0}, "ema"),
    ({"ema": -0.1}, "ema"),
    ({"limit_per_class": 0}, "limit_per_class"),
    ({"max_minutes": 0}, "max_minutes"),
])
def test_bad_options_are_named(change, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**BASE, **change)


def test_defaults_are_the_seed_recipe_and_round_trip():
    cfg = TrainConfig(**BASE)
    assert (cfg.pretrained, cfg.freeze, cfg.image_size, cfg.crop_scale) == \
        ("imagenet", "backbone", 224, 0.08)
    assert cfg.uses_feature_cache
    assert not TrainConfig(**BASE, cache_views=0).uses_feature_cache
    assert not TrainConfig(**BASE, freeze="none").uses_feature_cache
    assert TrainConfig.from_dict({**cfg.to_dict(), "from_a_newer_fxscore": 1}) == cfg
    assert TrainConfig(**BASE, pos_weight="2.5").pos_weight == "2.5"
    assert cfg.fit == "pad"


def test_a_run_saved_before_the_fit_option_resumes_stretching():
    old = {k: v for k, v in TrainConfig(**BASE).to_dict().items() if k != "fit"}
    assert TrainConfig.from_dict(old).fit == "stretch"
    assert TrainConfig.from_dict({**old, "fit": "pad"}).fit == "pad"


def test_resume_may_change_only_what_does_not_change_an_epoch():
    saved = TrainConfig(**BASE, lr=0.01)
    more = resumed_config(saved, {"epochs": 60, "max_minutes": 5.0, "device": "cpu",
                                  "workers": 2, "threads": 1, "data": "moved/data"})
    assert (more.epochs, more.data, more.lr) == (60, "moved/data", 0.01)
    assert resumed_config(saved, {"lr": 0.01}) == saved  # restating the recipe is fine
    with pytest.raises(ValueError, match="cannot change --lr 0.01 -> 0.1, --seed 0 -> 1"):
        resumed_config(saved, {"lr": 0.1, "seed": 1, "epochs": 3})
    assert set(RESUMABLE) >= {"epochs", "max_minutes", "device", "workers", "threads"}


def test_patience_may_change_on_resume_unless_it_times_the_lr_drops():
    cosine = TrainConfig(**BASE, scheduler="cosine", patience=5)
    assert resumed_config(cosine, {"patience": 30}).patience == 30
    with pytest.raises(ValueError, match="cannot change --patience 5 -> 30"):
        resumed_config(TrainConfig(**BASE, scheduler="plateau", patience=5), {"patience": 30})


@pytest.mark.parametrize("config, expected", [
    ({"data": "/site/x-rays/set", "out": "/home/alice/runs/r18", "pretrained": "none"},
     {"data": ".", "out": "r18", "pretrained": "none"}),
    ({"data": "/site/set", "out": "/site/set/runs/r1", "pretrained": "/opt/w/resnet18.pth"},
     {"data": ".", "out": "runs/r1", "pretrained": "resnet18.pth"}),
    ({"data": "/site/set", "out": "/site/set2/run", "pretrained": "imagenet", "lr": 0.1},
     {"data": ".", "out": "run", "pretrained": "imagenet", "lr": 0.1}),
    ({"lr": 0.1}, {"lr": 0.1}),  # a checkpoint not made by `fxscore train`
])
def test_portable_config_names_no_place_of_the_machine(config, expected):
    from fxscore.train.config import portable_config

    assert portable_config(config) == expected
