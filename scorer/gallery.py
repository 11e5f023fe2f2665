"""The eval report's gallery: the model's most confident mistakes, with heatmaps.

    html = gallery_html(model, ev)     # a <section>, inline images only; "" for no rows

Shows the most confident false positives (highest probability among images of the negative
class labelled positive), the most confident false negatives (lowest probability among
positive images labelled negative) and a few true positives, each as a thumbnail of the
radiograph and, when the model has heatmap outputs, the same thumbnail with its class
activation map (`fxscore.cam`). Images are embedded as base64 PNG data URIs, so the report
stays one self-contained file; they are derived patient images, so the report must be
handled like the inputs. A model without heatmap outputs gets the thumbnails and a note
naming `fxscore augment`.

Each file is read again for its thumbnail; one that changed since it was scored (its sha256
differs from the row's) or cannot be read is shown as a caption without an image.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cam import cam_cells, display_image, normalise, overlay, png_bytes, upsample
from .graph_outputs import FEATURE_MAP, has_roles

if TYPE_CHECKING:
    from .evaluate import Evaluation
    from .model import Model

PER_KIND = 6
TRUE_POSITIVES = 3
THUMB = 180  # pixels, the thumbnail's longest side

CSS = """
.gallery figure{display:inline-block;margin:0 12px 14px 0;vertical-align:top;width:auto}
.gallery .pair{display:flex;gap:4px}
.gallery img{display:block;border:1px solid #ccc;image-rendering:auto}
.gallery figcaption{font-size:12px;max-width:370px;word-break:break-all;margin-top:3px}
.gallery .ood{color:#b03a2e;font-weight:bold}
"""


def pick(ev: "Evaluation", per_kind: int = PER_KIND,
         true_positives: int = TRUE_POSITIVES) -> dict[str, list[dict[str, Any]]]:
    """The rows to show, by kind, most confident first."""
    pos = ev.positive_class
    ok = ev.readable
    fp = [r for r in ok if r["true_label"] != pos and r["label"] == pos]
    fn = [r for r in ok if r["true_label"] == pos and r["label"] != pos]
    tp = [r for r in ok if r["true_label"] == pos and r["label"] == pos]
    return {"false positives": sorted(fp, key=lambda r: -r["probability"])[:per_kind],
            "false negatives": sorted(fn, key=lambda r: r["probability"])[:per_kind],
            "true positives": sorted(tp, key=lambda r: -r["probability"])[:true_positives]}


def _data_uri(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")


def _thumbs(model: "Model", file: Path, sha256: str, heatmaps: bool
            ) -> tuple[str | None, str | None, str]:
    """(thumbnail URI, heatmap URI, note) for one file."""
    from .images import ImageReadError, open_regular, read_image
    from .scoring import model_input

    try:
        with open_regular(file) as f:
            data = f.read()
    except (OSError, ImageReadError) as e:
        return None, None, f"cannot be read again ({type(e).__name__})"
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        return None, None, "changed since it was scored"
    try:
        image = display_image(read_image(io.BytesIO(data), name=str(file),
                                         min_size=(THUMB, THUMB)), THUMB)
        grey = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
        thumb = _data_uri(np.stack([grey] * 3, axis=-1))
        if not heatmaps:
            return thumb, None, ""
        x = model_input(io.BytesIO(data), model.meta.preprocess, name=str(file))
        fm = model.predict_with(x[None], (FEATURE_MAP,))[FEATURE_MAP][0]
        heat = upsample(normalise(cam_cells(fm, model.meta.cam["weights"])), image.shape,
                        model.meta.preprocess)
        return thumb, _data_uri(overlay(image, heat)), ""
    except ImageReadError as e:
        return None, None, f"cannot be decoded again ({type(e).__name__})"


def _figure(model: "Model", root: Path, row: dict[str, Any], heatmaps: bool) -> str:
    thumb, heat, note = _thumbs(model, root / row["path"], row.get("sha256") or "", heatmaps)
    e = html.escape
    images = "".join(f'<img src="{uri}" alt="{e(alt)}">' for uri, alt in
                     ((thumb, "radiograph"), (heat, "heatmap")) if uri)
    ood = (' <span class="ood">OOD: unlike the images the model was made for</span>'
           if row.get("ood") else "")
    caption = (f'<span class="mono">{e(str(row["path"]))}</span><br>p = '
               f'{row["probability"]:.3f}, true: {e(row["true_label"])}{ood}'
               + (f"<br><i>{e(note)}</i>" if note else ""))
    return f'<figure><div class="pair">{images}</div><figcaption>{caption}</figcaption></figure>'


def gallery_html(model: "Model", ev: "Evaluation", *, per_kind: int = PER_KIND,
                 true_positives: int = TRUE_POSITIVES) -> str:
    """The gallery section of the eval report ("" when there is nothing to show)."""
    chosen = pick(ev, per_kind, true_positives)
    if not any(chosen.values()):
        return ""
    root = Path(ev.metrics.get("data", {}).get("root", "."))
    heatmaps = has_roles(model, (FEATURE_MAP,)) and bool(model.meta.cam)
    pos, t = html.escape(ev.positive_class), ev.threshold
    parts = [f"<style>{CSS}</style>", '<section class="gallery"><h2>Gallery</h2>',
             f"<p>The model's most confident mistakes at the threshold {t:g}, and a few true "
             f"positives: each radiograph, and beside it its class activation map (where the "
             f"model found evidence for <b>{pos}</b>; one cell per 32 x 32 input pixels, so it "
             "points at a region, not a line). These are patient images: handle this report "
             "like the inputs.</p>"]
    if not heatmaps:
        parts.append("<p><i>This model has no heatmap outputs: re-export it, or add them with "
                     "<code>fxscore augment MODEL --out NEW.onnx</code>.</i></p>")
    titles = {"false positives": f"Most confident false positives (not {pos}, scored highest)",
              "false negatives": f"Most confident false negatives ({pos}, scored lowest)",
              "true positives": "True positives (scored highest)"}
    for kind, rows in chosen.items():
        parts.append(f"<h3>{html.escape(titles[kind])}</h3>")
        parts.append("".join(_figure(model, root, r, heatmaps) for r in rows)
                     if rows else "<p>none</p>")
    parts.append("</section>")
    return "\n".join(parts)
