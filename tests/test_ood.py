"""fxscore.ood: Mahalanobis distance under a Ledoit-Wolf covariance, its threshold, fitting on files."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fxscore.contract import Preprocess
from fxscore.explain_graph import augment
from fxscore.model import load_model
from fxscore.ood import (OodError, conformal_threshold, embed_ood, fit_features, fit_ood,
                         fold_of, ledoit_wolf, mahalanobis)
from onnx_models import make_convnet, make_meta


def _gaussian(n: int, p: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((p, p)) / np.sqrt(p)
    return rng.standard_normal((n, p)) @ mix + 2.0, mix


@pytest.mark.parametrize("n, p", [(40, 100), (300, 20), (200, 512)])
def test_ledoit_wolf_matches_scikit_learn(n, p):
    sklearn = pytest.importorskip("sklearn.covariance")
    x, _ = _gaussian(n, p, seed=n)
    mean, cov, s = ledoit_wolf(x)
    ref = sklearn.LedoitWolf().fit(x)
    assert s == pytest.approx(ref.shrinkage_, abs=1e-12)
    np.testing.assert_allclose(cov, ref.covariance_, atol=1e-12)
    np.testing.assert_allclose(mean, x.mean(axis=0))


def test_mahalanobis_is_the_distance_under_the_inverse_covariance():
    x, _ = _gaussian(80, 6, seed=1)
    stats = fit_features(x)
    cov = (stats.eigenvectors * stats.eigenvalues) @ stats.eigenvectors.T
    y = x[:5] + 0.3
    direct = np.sqrt(np.einsum("ij,jk,ik->i", y - stats.mean, np.linalg.inv(cov), y - stats.mean))
    np.testing.assert_allclose(stats.distance(y), direct, rtol=1e-9)
    np.testing.assert_allclose(mahalanobis(y, stats.mean, stats.whitening()), direct, rtol=1e-9)


def test_the_conformal_threshold_is_the_stated_order_statistic():
    d = np.arange(1, 251, dtype=float)  # 250 distances 1..250
    assert conformal_threshold(d, 0.01) == 249.0  # ceil(0.99 * 251) = 249th smallest
    assert conformal_threshold(d, 0.10) == 226.0  # ceil(0.9 * 251) = 226
    assert conformal_threshold(d[:50], 0.01) == 50.0  # too few: the largest


def test_new_images_from_the_same_distribution_are_flagged_at_about_the_stated_rate():
    x, mix = _gaussian(400, 32, seed=2)
    stats = fit_features(x, false_flag_rate=0.05)
    rng = np.random.default_rng(99)
    fresh = rng.standard_normal((5000, 32)) @ mix + 2.0
    rate = float(np.mean(stats.distance(fresh) > stats.threshold))
    assert 0.01 < rate < 0.10  # 5% stated; shrinkage and a finite fit spread it a little
    assert stats.holdout_images == 400 and stats.fit_images == 400
    shifted = fresh[:200] + 8 * mix[0]  # 8 standard deviations along one latent direction
    assert np.mean(stats.distance(shifted) > stats.threshold) > 0.9


def test_byte_identical_copies_share_a_fold():
    assert fold_of("ab" * 32, 5) == fold_of("ab" * 32, 5) == int("abababab", 16) % 5


@pytest.mark.parametrize("features, message", [
    (np.zeros((10, 4)), "at least 20"),
    (np.full((30, 4), np.nan), "NaN"),
    (np.ones((30, 4)), "constant features"),
])
def test_unfittable_features_are_refused(features, message):
    with pytest.raises(OodError, match=message):
        fit_features(features)


def test_contract_summary_is_valid_metadata():
    from fxscore.graph_outputs import check_optional

    x, _ = _gaussian(60, 8, seed=3)
    summary = fit_features(x, excluded={"colour": 2}).contract()
    check_optional({"outputs": {"ood_score": "ood_score"}, "ood": summary})
    assert summary["excluded"] == {"colour": 2} and summary["dim"] == 8


def _textures(folder, n, seed, colour=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        small = rng.random((6, 6))
        img = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize(
            (40, 40), Image.Resampling.BICUBIC))
        f = folder / f"{'c' if colour else 't'}{i:03d}.png"
        if colour:  # a grey texture with a red arrow-like stroke: an annotated figure
            rgb = np.stack([img] * 3, axis=-1)
            rgb[10:14, 5:35] = (255, 0, 0)
            Image.fromarray(rgb).save(f)
        else:
            Image.fromarray(img).save(f)
        files.append(f)
    return files


@pytest.fixture
def explain_cnn(tmp_path):
    meta = make_meta(preprocess=Preprocess(input_size=(32, 32)), model_name="test-cnn")
    path = make_convnet(tmp_path / "cnn.onnx", meta)
    data, meta = augment(path.read_bytes(), load_model(path).meta)
    out = tmp_path / "cnn.explain.onnx"
    out.write_bytes(data)
    return out


def test_fit_ood_on_files_leaves_out_colour_and_unreadable_images(tmp_path, explain_cnn):
    files = _textures(tmp_path / "val", 30, seed=0) + _textures(tmp_path / "val", 3, seed=1,
                                                                 colour=True)
    (tmp_path / "val" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    files.append(tmp_path / "val" / "broken.png")
    stats = fit_ood(load_model(explain_cnn), files)
    assert stats.fit_images == 30
    assert stats.excluded == {"colour": 3, "unreadable": 1}


def test_embed_ood_rewrites_the_model_with_its_statistics(tmp_path, explain_cnn):
    files = _textures(tmp_path / "val", 40, seed=0)
    meta, summary = embed_ood(explain_cnn, files)
    model = load_model(explain_cnn)
    assert model.verified and model.meta.ood == meta.ood
    assert meta.ood["fit_images"] == 40 and meta.ood["threshold"] == summary["threshold"]
    from fxscore.scoring import score_items

    rows = list(score_items(model, [(f.name, f) for f in _textures(tmp_path / "new", 4, 5)]))
    x = np.zeros((1, 3, 32, 32), np.float32) + 50  # far outside anything seen
    assert model.predict_with(x, ("ood_score",))["ood_score"][0] > meta.ood["threshold"]
    assert all(r["probability"] is not None for r in rows)


def test_eval_rows_carry_the_flag_and_are_summarised_apart(tmp_path, explain_cnn):
    from fxscore.evaluate import evaluate
    from fxscore.ood import ood_summary

    meta, _ = embed_ood(explain_cnn, _textures(tmp_path / "val", 40, seed=0))
    model = load_model(explain_cnn)
    root = tmp_path / "eval"
    _textures(root / "fractured", 6, seed=3)
    _textures(root / "not fractured", 6, seed=4)
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(root / "fractured" / "white.png")
    ev = evaluate(root, model, n_bootstrap=0)
    assert all(isinstance(r["ood"], bool) for r in ev.rows)
    white = next(r for r in ev.rows if r["path"].endswith("white.png"))
    assert white["ood"] is True and white["ood_score"] > meta.ood["threshold"]
    summary = ood_summary(ev.rows, "fractured", 0.5)
    assert summary["flagged"] >= 1
    assert (summary["in_distribution"]["images"] + summary["out_of_distribution"]["images"]
            == len(ev.rows))
    assert ood_summary([{**r, "ood": None} for r in ev.rows], "fractured", 0.5) is None
    # eval's metrics, text and HTML carry the split
    from fxscore.report import format_text, render_html

    got = ev.metrics["ood"]  # (NaN metrics of a one-class part do not compare equal)
    assert (got["flagged"], got["in_distribution"]["images"]) == (summary["flagged"],
                                                                 13 - summary["flagged"])
    assert got["in_distribution"]["roc_auc"] == summary["in_distribution"]["roc_auc"]
    text = format_text(ev)
    assert (f"OOD flag: {summary['flagged']} of 13 readable images flagged as unlike the images "
            "the model was made for") in text and "In distribution: " in text
    assert "OOD flag: " in render_html(ev)


def test_with_a_holdout_the_threshold_comes_from_the_held_out_images():
    x, mix = _gaussian(400, 32, seed=5)
    rng = np.random.default_rng(6)
    held = rng.standard_normal((300, 32)) @ mix + 2.0
    stats = fit_features(x, false_flag_rate=0.05, holdout=held)
    assert (stats.fit_images, stats.holdout_images) == (400, 300)
    assert stats.threshold == conformal_threshold(stats.distance(held), 0.05)
    assert stats.holdout_flagged <= 0.05 and stats.contract()["threshold_from"] == "held-out images"
    with pytest.raises(OodError, match="held-out"):
        fit_features(x, holdout=held[:5])


def test_fit_ood_with_holdout_files(tmp_path, explain_cnn):
    train = _textures(tmp_path / "train", 30, seed=0)
    val = _textures(tmp_path / "val", 25, seed=1) + _textures(tmp_path / "val", 2, seed=2,
                                                               colour=True)
    stats = fit_ood(load_model(explain_cnn), train, holdout=val)
    assert (stats.fit_images, stats.holdout_images) == (30, 25)
    assert stats.excluded == {"colour": 2}


# ---------------------------------------------------------------------------- stage features


def test_fit_ood_reads_the_graphs_stage_statistics_where_it_has_them(tmp_path, explain_cnn):
    from test_explain_graph import make_resnet

    from fxscore.graph_outputs import STATS_FEATURE
    from fxscore.scoring import model_input

    source = make_resnet(tmp_path / "resnet.onnx")
    data, _ = augment(source.read_bytes(), load_model(source).meta)
    (tmp_path / "resnet.explain.onnx").write_bytes(data)
    files = _textures(tmp_path / "val", 40, seed=0)
    meta, summary = embed_ood(tmp_path / "resnet.explain.onnx", files)
    assert summary["feature"] == meta.ood["feature"] == STATS_FEATURE and summary["dim"] == 56
    model = load_model(tmp_path / "resnet.explain.onnx")
    x = np.stack([model_input(f, model.meta.preprocess) for f in files[:4]])
    out = model.predict_with(x, ("ood_features", "ood_score"))
    stats = fit_ood(model, files)  # the same fit, through the same graph
    np.testing.assert_allclose(out["ood_score"], stats.distance(out["ood_features"]), rtol=1e-4)
    assert stats.threshold == pytest.approx(meta.ood["threshold"])
    # a graph without that structure: the pooled features, as before
    assert fit_ood(load_model(explain_cnn), files).contract()["feature"] == "pooled"


def test_ood_cells_flag_colour_whatever_the_distance():
    from fxscore.ood import ood_cells

    assert ood_cells(1.0, 5.0) == (1.0, False)
    assert ood_cells(1.0, 5.0, colour=True) == (1.0, True)  # the score stays the distance
    assert ood_cells(None, 5.0, colour=True) == (None, None)


def test_the_run_flags_colour_by_the_fits_rule(tmp_path):
    """What the fit leaves out as colour (`image_info(decode=True)`, the data set's rule)
    is what `fxscore run` flags, from the pixels it decodes to score."""
    import io

    from fxscore.contract import Preprocess
    from fxscore.images import ImageReadError, image_info
    from fxscore.scoring import model_input, model_input_with_colour

    colour = _textures(tmp_path, 1, seed=0, colour=True)[0]
    grey = _textures(tmp_path, 1, seed=1)[0]
    rgb_grey = tmp_path / "rgb-grey.png"  # a grey radiograph stored as RGB
    Image.open(grey).convert("RGB").save(rgb_grey)
    params = Preprocess(input_size=(32, 32))
    for f, want in ((colour, True), (grey, False), (rgb_grey, False)):
        x, shows = model_input_with_colour(io.BytesIO(f.read_bytes()), params, name=str(f))
        assert shows is want is image_info(f, decode=True)["has_colour"], f
        np.testing.assert_array_equal(x, model_input(f, params))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ImageReadError, match="broken.png"):
        model_input_with_colour(broken, params)
