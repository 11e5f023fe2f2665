"""fxscore.train.features: cached backbone features are what the full network would compute."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fxscore.contract import Preprocess  # noqa: E402
from fxscore.train.data import TrainViews, chunks, decode, discover, epoch_order  # noqa: E402
from fxscore.train.features import backbone, cached_batches, extract, view_cache  # noqa: E402
from fxscore.train.model import build_model  # noqa: E402
from fxscore.train.presets import TrainPreset  # noqa: E402

pytestmark = pytest.mark.torch
SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def views() -> TrainViews:
    samples = discover(SAMPLE, limit_per_class=5).splits["train"]
    decoded = decode(samples, lambda im: im.astype(np.float16))
    return TrainViews(decoded.arrays, decoded.targets, TrainPreset(Preprocess(input_size=(64, 64))),
                      seed=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        return build_model("none", "backbone").eval()


def test_head_on_backbone_features_is_the_network(model, views):
    x = torch.stack([views[(0, i)][0] for i in range(4)])
    with torch.inference_mode():
        feats = backbone(model)(x)
        assert feats.shape == (4, 512)
        torch.testing.assert_close(model.fc(feats), model(x), rtol=1e-5, atol=1e-5)


def test_view_cache_holds_view_v_of_every_image(model, views):
    calls = []
    feats = view_cache(model, views, n_views=2, batch_size=4, device=CPU,
                       progress=lambda done, total: calls.append((done, total)))
    assert feats.shape == (2, len(views), 512)
    assert calls[-1] == (2 * len(views), 2 * len(views))
    with torch.inference_mode():
        for v in (0, 1):
            x = torch.stack([views[(v, i)][0] for i in range(len(views))])
            torch.testing.assert_close(feats[v], backbone(model)(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(feats[0], feats[1])


def test_cached_batches_follow_the_naive_order_with_random_views():
    n_views, n = 3, 21
    # Feature k of (view v, image i) encodes (v, i), so a batch tells what was picked.
    feats = torch.tensor([[[v, i] for i in range(n)] for v in range(n_views)], dtype=torch.float32)
    targets = torch.arange(n, dtype=torch.float32)
    batches = list(cached_batches(feats, targets, seed=0, epoch=2, batch_size=5))
    assert [len(y) for _, y in batches] == [len(c) for c in chunks(range(n), 5)]
    images = torch.cat([x[:, 1] for x, _ in batches]).long().tolist()
    assert images == epoch_order(n, 0, 2).tolist()[:len(images)]
    assert torch.cat([y for _, y in batches]).long().tolist() == images
    picked = torch.cat([x[:, 0] for x, _ in batches])
    assert set(picked.long().tolist()) == {0, 1, 2}
    again = torch.cat([x[:, 0] for x, _ in cached_batches(feats, targets, 0, 2, 5)])
    other = torch.cat([x[:, 0] for x, _ in cached_batches(feats, targets, 0, 3, 5)])
    assert torch.equal(picked, again) and not torch.equal(picked, other)


def test_extract_reports_progress_and_keeps_order(model, views):
    x = torch.stack([views[(0, i)][0] for i in range(6)])
    seen = []
    feats = extract(backbone(model), [(x[:4], None), (x[4:], None)], CPU, progress=seen.append)
    assert seen == [4, 2]
    with torch.inference_mode():
        torch.testing.assert_close(feats, backbone(model)(x), rtol=1e-4, atol=1e-4)
