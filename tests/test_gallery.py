"""fxscore.gallery: the eval report's most confident mistakes, with heatmaps, inline."""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import pytest
from PIL import Image

from eval_data import make_folders
from fxscore.evaluate import evaluate
from fxscore.explain_graph import augment
from fxscore.gallery import gallery_html, pick
from fxscore.model import load_model
from onnx_models import make_model


@pytest.fixture
def models(tmp_path):
    plain = make_model(tmp_path / "tiny.onnx")
    data, _ = augment(plain.read_bytes(), load_model(plain).meta)
    (tmp_path / "tiny.explain.onnx").write_bytes(data)
    return load_model(plain), load_model(tmp_path / "tiny.explain.onnx")


def _images(doc: str) -> list[Image.Image]:
    out = []
    for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', doc):
        out.append(Image.open(io.BytesIO(base64.b64decode(b64))))
    return out


def test_gallery_shows_the_most_confident_mistakes_with_heatmaps(tmp_path, models):
    _, model = models
    ev = evaluate(make_folders(tmp_path / "data"), model, n_bootstrap=0)
    chosen = pick(ev)
    # eval_data: not-fractured greys 150 and 125 score above the cut, fractured 100, 90 below
    assert [r["path"].rsplit("_g", 1)[1] for r in chosen["false positives"]] == ["150.png",
                                                                               "125.png"]
    assert [r["path"].rsplit("_g", 1)[1] for r in chosen["false negatives"]] == ["90.png",
                                                                               "100.png"]
    assert len(chosen["true positives"]) == 3
    doc = gallery_html(model, ev)
    images = _images(doc)
    assert len(images) == 2 * (2 + 2 + 3)  # radiograph + heatmap per figure
    assert all(im.size == (32, 32) for im in images)
    assert "Most confident false positives" in doc and "fxscore augment" not in doc
    assert "<script" not in doc and "http" not in doc  # self-contained


def test_without_heatmap_outputs_it_shows_thumbnails_and_names_the_fix(tmp_path, models):
    plain, _ = models
    ev = evaluate(make_folders(tmp_path / "data"), plain, n_bootstrap=0)
    doc = gallery_html(plain, ev)
    assert len(_images(doc)) == 7 and "fxscore augment MODEL --out NEW.onnx" in doc


def test_a_file_changed_since_scoring_is_captioned_not_shown(tmp_path, models):
    _, model = models
    ev = evaluate(make_folders(tmp_path / "data"), model, n_bootstrap=0)
    row = pick(ev)["false positives"][0]
    Image.new("L", (24, 24), 0).save(tmp_path / "data" / row["path"])
    doc = gallery_html(model, ev)
    assert "changed since it was scored" in doc and len(_images(doc)) == 12


def test_nothing_to_show_gives_no_section(tmp_path, models):
    _, model = models
    ev = evaluate(make_folders(tmp_path / "data", fractured=[250], not_fractured=[10]), model,
                  n_bootstrap=0)
    assert pick(ev)["false positives"] == [] and gallery_html(model, ev) != ""
    ev.rows = [dict(r, error="x") for r in ev.rows]
    assert gallery_html(model, ev) == ""


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


def _eval_report(tmp_path) -> str:
    """`fxscore eval --report` with the explain model of `models`: report.html's text."""
    from click.testing import CliRunner

    from fxscore.cli import cli

    make_folders(tmp_path / "data")
    r = CliRunner().invoke(cli, ["eval", str(tmp_path / "data"), "-m",
                                 str(tmp_path / "tiny.explain.onnx"), "--report",
                                 str(tmp_path / "report"), "--bootstrap", "0", "-q"])
    assert r.exit_code == 0, r.output
    return (tmp_path / "report" / "report.html").read_text()


def test_eval_report_carries_the_gallery(tmp_path, models):
    doc = _eval_report(tmp_path)
    assert "<h2>Gallery</h2>" in doc and doc.count('alt="heatmap"') == 7


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium_without_network(tmp_path, models):
    """The whole eval report, gallery included, in a real browser: every image decodes
    (naturalWidth > 0) under a policy that forbids any request leaving the file."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium (apt-get install chromium)")
    doc = _eval_report(tmp_path)
    n = doc.count("<img ")
    policy = ("<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
              "img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">")
    probe = ("<script>window.onload=()=>{const i=[...document.images];document.title="
             "'decoded '+i.filter(x=>x.naturalWidth>0).length+'/'+i.length}</script>")
    page = tmp_path / "probe.html"
    page.write_text(doc.replace("<head>", "<head>" + policy, 1).replace("</body>",
                                                                        probe + "</body>", 1))
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert f"<title>decoded {n}/{n}</title>" in proc.stdout, proc.stderr[-2000:]
    assert n >= 14 + 4  # 7 gallery figures x 2, and the report's own figures
