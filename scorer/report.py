"""An `Evaluation` as text (stdout), metrics.json, predictions.csv and one self-contained HTML page.

The HTML report carries everything inline (CSS, figures as base64 PNG data URIs, no scripts),
so it can be mailed, archived next to a model, or opened on a ward PC without network access.
Figures are drawn with matplotlib's Agg canvas through `Figure` objects, never pyplot, so no
GUI backend or global figure state is involved.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, csvsafe
from .atomicfile import write_files
from .evaluate import Evaluation
from .info import model_pairs
from .membership import copies_sentence
from .metrics import CI_METRICS

POINT_LABELS = {"accuracy": "Accuracy", "sensitivity": "Sensitivity (recall)",
                "specificity": "Specificity", "precision": "Precision (PPV)", "npv": "NPV",
                "f1": "F1"}
POS_COLOUR, NEG_COLOUR = "#c0392b", "#2471a3"
POINT_STYLE = {"model": dict(marker="o", color="#111111"),
               "target_specificity": dict(marker="s", color="#8e44ad"),
               "target": dict(marker="D", color="#e67e22")}


# ---- numbers ---------------------------------------------------------------------------------

def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _ci(ci: dict[str, Any] | None, digits: int = 3) -> str:
    if not ci or not ci.get("valid"):
        return ""
    return f"[{_f(ci['low'], digits)}, {_f(ci['high'], digits)}]"


def _point_title(name: str, point: dict[str, Any]) -> str:
    if name == "target":
        return (f"target sensitivity {_f(point['target_sensitivity'], 2)} "
                f"(threshold {point['threshold']:.4g})")
    if name == "target_specificity":
        return (f"target specificity {_f(point['target_specificity'], 2)} "
                f"(threshold {point['threshold']:.4g})")
    if point.get("source") == "--threshold":
        return f"threshold {_f(point['threshold'], 3)} (--threshold)"
    return f"model threshold {_f(point['threshold'], 3)}"


def _threshold_text(m: dict[str, Any]) -> str:
    """The threshold in effect, and where it came from when it is not the model's own."""
    t = m.get("threshold") or {"value": m["model"]["threshold"], "source": "model"}
    if t["source"] == "--threshold":
        return f"threshold {_f(t['value'])} (--threshold; the model's own is {_f(t['model'])})"
    return f"threshold {_f(t['value'])}"


def _files(n: int, word: str = "file") -> str:
    plural = word[:-1] + "ies" if word.endswith("y") else word + "s"
    return f"{n} {word if n == 1 else plural}"


def _reason(failed: dict[str, Any]) -> str:
    """The error without its leading file name, which the listing already shows."""
    error, marker = failed["error"], failed["path"] + ": "
    i = error.find(marker)
    return error[i + len(marker):] if i >= 0 else error


def _unit(data: dict[str, Any]) -> str:
    return "study" if data.get("level") == "study" else "file"


def ood_sentence(m: dict[str, Any]) -> str:
    """The OOD flag's split of the metrics (`fxscore.ood.ood_summary`), "" without one."""
    o = m.get("ood")
    if not o:
        return ""

    def part(p: dict[str, Any]) -> str:
        if not p["images"]:
            return "none"
        auc = f"ROC-AUC {_f(p['roc_auc'])}, " if p.get("roc_auc") is not None else ""
        return (f"{auc}sensitivity {_f(p['sensitivity'])}, specificity "
                f"{_f(p['specificity'])} on {_files(p['images'], 'image')}")

    inside = o["in_distribution"]["images"]
    return (f"OOD flag: {o['flagged']} of {inside + o['flagged']} readable images flagged as "
            f"unlike the images the model was made for ({o['flagged_share']:.1%}); they keep "
            f"their scores and are in the metrics above. In distribution: "
            f"{part(o['in_distribution'])}; flagged: {part(o['out_of_distribution'])}.")


def study_sentence(m: dict[str, Any]) -> str:
    """How a study-level evaluation formed its studies (text and HTML say the same)."""
    data, pos = m["data"], m["positive_class"]
    keys = data.get("study_keys", {})
    formed = " and ".join(f"{n} by {'folder' if k == 'folder' else k}"
                          for k, n in sorted(keys.items()))
    incomplete = data.get("incomplete_studies", 0)
    return (f"Metrics per study ({formed}): a study is '{pos}' when any of its images is "
            "labelled so; its score is its highest image probability"
            + (f"; {_files(incomplete, 'study')} incomplete (some images unreadable: a missing "
               "image may be the fractured one)" if incomplete else "") + ".")


# ---- text --------------------------------------------------------------------------------

def format_text(ev: Evaluation, max_failed: int = 20) -> str:
    """The stdout report: scikit-learn's classification report, confusion matrix and the rest."""
    m = ev.metrics
    model, data = m["model"], m["data"]
    at_threshold = m["operating_points"]["model"]["threshold"]
    lines = [f"model {model['model_name']}, version {model['model_version']} (id "
             f"{model['model_id']}), positive class '{m['positive_class']}', {_threshold_text(m)}",
             f"data  {_files(data['files'], _unit(data))} in {data['root']}"
             + (f" ({_files(data['images'], 'image')})" if _unit(data) == "study" else "")
             + ": "
             + ", ".join(f"{c} {v['files']}" for c, v in data["per_class"].items())
             + (f"; {data['unreadable']} unreadable, metrics use the {data['readable']} readable"
                if data["unreadable"] else "")
             + (f"; {data['ignored']} non-image files ignored" if data.get("ignored") else "")
             + (f"; labels from {data['labels_csv']}" if data["source"] == "labels" else "")
             + (f"; {_files(data['unlabelled'], 'image file')} without a label row not "
                "evaluated" if data.get("unlabelled") else ""),
             ""]
    if _unit(data) == "study":
        lines[-1:] = [study_sentence(m), ""]
    if data.get("one_class"):
        lines[-1:] = [f"only '{data['one_class']}' images are readable here: metrics that need "
                      "both classes are n/a", ""]
    copies = copies_sentence(m)  # images the model was trained on (fxscore.membership)
    if copies:
        lines[-1:] = [copies, ""]
    if ood_sentence(m):
        lines[-1:] = [ood_sentence(m), ""]

    lines += [f"Classification report (threshold {_f(at_threshold)})",
              m["classification_report_text"].rstrip(), ""]

    cm = m["confusion_matrix"]
    width = max(len(c) for c in cm["labels"]) + 2
    lines.append("Confusion matrix (rows: true class, columns: predicted class)")
    lines.append(" " * (width + 2) + "".join(f"{c:>{width}}" for c in cm["labels"]))
    for c, row in zip(cm["labels"], cm["matrix"]):
        lines.append(f"  {c:<{width}}" + "".join(f"{v:>{width}}" for v in row))
    lines.append("")

    boot = m["bootstrap"]
    ci_head = f"{int(boot['level'] * 100)}% CI" if boot else ""
    lines.append(f"{'':<24}{'value':>8}  {ci_head}")
    for key, label in (("roc_auc", "ROC-AUC"), ("average_precision", "Average precision")):
        valid = m[key]["ci"]["valid"] if m[key]["ci"] else None
        note = (f"  ({valid}/{boot['n_resamples']} resamples had both classes)"
                if boot and valid is not None and valid < boot["n_resamples"] else "")
        lines.append(f"{label:<24}{_f(m[key]['value']):>8}  {_ci(m[key]['ci'])}{note}")
    cal = m["calibration"]
    lines.append(f"{'Brier score':<24}{_f(cal['brier']):>8}")
    lines.append(f"{'Calibration error (ECE)':<24}{_f(cal['expected_calibration_error']):>8}")
    lines.append("")

    for name, p in m["operating_points"].items():
        lines.append(f"At {_point_title(name, p)}: TP {p['tp']}  FP {p['fp']}  "
                     f"TN {p['tn']}  FN {p['fn']}")
        for key, label in POINT_LABELS.items():
            ci = p.get("ci", {}).get(key)
            lines.append(f"  {label:<22}{_f(p[key]):>8}  {_ci(ci)}".rstrip())
        lines.append("")

    lines.append(f"{'Reliability':<11}{'images':>10}{'predicted':>11}{'observed':>10}")
    lines += [f"  {r['lower']:.1f} - {r['upper']:.1f}{r['count']:>10}{_f(r['mean_predicted']):>11}"
              f"{_f(r['fraction_positive']):>10}" for r in cal["reliability_curve"]]
    lines.append("")

    if boot:
        lines.append(f"Intervals: percentile bootstrap, {boot['n_resamples']} resamples, seed "
                     f"{boot['seed']}" + (f", resampling {boot['clusters']} groups"
                                          if boot["grouped"] else "")
                     + "; thresholds held fixed.")
    failed = m["unreadable_files"]
    if failed:
        lines.append(f"{_files(len(failed))} could not be read and "
                     f"{'is' if len(failed) == 1 else 'are'} not in the metrics:")
        lines += [f"  {f['path']}: {_reason(f)}" for f in failed[:max_failed]]
        if len(failed) > max_failed:
            lines.append(f"  ... and {len(failed) - max_failed} more (see predictions.csv)")
    text = "\n".join(lines).rstrip() + "\n"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")  # undecodable file names


# ---- files -------------------------------------------------------------------------------

def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return x


def metrics_json(ev: Evaluation) -> str:
    """metrics.json: the metrics document, NaN written as null (undefined, e.g. no positives)."""
    doc = {k: v for k, v in ev.metrics.items() if k != "classification_report_text"}
    doc = {"fxscore_version": __version__,
           "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **doc}
    return json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n"


PREDICTION_COLUMNS_EXTRA = ("true_label",)


def predictions_csv(rows: list[dict[str, Any]]) -> str:
    """predictions.csv: `fxscore run`'s columns, values written the same way, plus true_label.

    Text cells go through `fxscore.csvsafe` like every CSV fxscore writes (formulas
    neutralised, undecodable bytes as \\xHH), so `--labels`/`--groups` read the paths back
    exactly.
    """
    from .output import FIXED_COLUMNS, csv_cells, header_line

    lines = [header_line((*FIXED_COLUMNS, *PREDICTION_COLUMNS_EXTRA))]
    lines += [csvsafe.format_row(csv_cells(row) + [csvsafe.text(row["true_label"])])
              for row in rows]
    return "".join(lines)


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write predictions.csv atomically (see `predictions_csv`)."""
    write_files({path: predictions_csv(rows)})


def write_report(ev: Evaluation, out_dir: str | Path) -> dict[str, Path]:
    """Write predictions.csv, metrics.json and report.html into out_dir (created if needed);
    a study-level evaluation also writes studies.csv (predictions.csv keeps the images).

    All three are written to temporary files first and renamed into place only when every one
    is complete (`fxscore.atomicfile`): a full disk leaves the previous report, never a 0-byte
    or half-written one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"predictions": out / "predictions.csv", "metrics": out / "metrics.json",
             "report": out / "report.html"}
    page = render_html(ev).encode("utf-8", "backslashreplace")  # undecodable names, visibly
    files = {paths["predictions"]: predictions_csv(ev.image_rows),
             paths["metrics"]: metrics_json(ev), paths["report"]: page}
    if ev.images is not None:
        paths["studies"] = out / "studies.csv"
        files[paths["studies"]] = studies_csv(ev.rows)
    write_files(files)
    return paths


STUDY_COLUMNS = ("study", "key", "images", "failed", "max_probability", "mean_probability",
                 "label", "true_label", "threshold", "model_id", "error")


def studies_csv(rows: list[dict[str, Any]]) -> str:
    """studies.csv of a study-level evaluation: `fxscore studies`' columns plus true_label
    and error (a study none of whose images could be read)."""
    def number(x: Any) -> Any:
        return "" if x is None else round(float(x), 6)

    buffer = io.StringIO(newline="")
    csvsafe.write_rows(buffer, STUDY_COLUMNS, (
        [r["path"], r["study_key"], r["images"], r["failed"], number(r["probability"]),
         number(r["mean_probability"]), r["label"], r["true_label"], number(r["threshold"]),
         r["model_id"], r["error"]] for r in rows))
    return buffer.getvalue()


# ---- figures -----------------------------------------------------------------------------

def _figure(w: float = 5.0, h: float = 4.4):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=130, layout="constrained")


def _style(ax) -> None:
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=9)
    ax.title.set_fontsize(11)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _short_title(name: str, p: dict[str, Any]) -> str:
    if name == "target":
        return f"sensitivity >= {p['target_sensitivity']:g} (threshold {p['threshold']:.3g})"
    if name == "target_specificity":
        return f"specificity >= {p['target_specificity']:g} (threshold {p['threshold']:.3g})"
    if p.get("source") == "--threshold":
        return f"threshold {p['threshold']:.3f} (--threshold)"
    return f"model threshold {p['threshold']:.3f}"


def _mark_points(ax, m: dict[str, Any], xy) -> None:
    for name, p in m["operating_points"].items():
        x, y = xy(p)
        ax.plot([x], [y], linestyle="none", markersize=8, markeredgecolor="white", zorder=5,
                label=_short_title(name, p), **POINT_STYLE[name])


def _needs_both_classes(title: str) -> str:
    """An empty panel saying why: a one-class evaluation has no ROC or PR curve."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, "needs images of both classes", ha="center", va="center",
            color="#6b7280")
    ax.set(xticks=[], yticks=[], title=title)
    _style(ax)
    return _png(fig)


def roc_figure(ev: Evaluation) -> str:
    from sklearn.metrics import roc_curve

    y, s = ev.arrays()
    if y.min() == y.max():
        return _needs_both_classes("ROC curve")
    fpr, tpr, _ = roc_curve(y, s)
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#9ca3af", linestyle="--", linewidth=1, label="chance")
    ax.plot(fpr, tpr, color=POS_COLOUR, linewidth=2,
            label=f"model (AUC {_f(ev.metrics['roc_auc']['value'])})")
    _mark_points(ax, ev.metrics, lambda p: (1 - p["specificity"], p["sensitivity"]))
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title="ROC curve")
    ax.legend(loc="lower right", fontsize=8, frameon=True, framealpha=0.9, edgecolor="#e5e7eb")
    _style(ax)
    return _png(fig)


def pr_figure(ev: Evaluation) -> str:
    from sklearn.metrics import precision_recall_curve

    y, s = ev.arrays()
    if y.min() == y.max():
        return _needs_both_classes("Precision-recall curve")
    precision, recall, _ = precision_recall_curve(y, s)
    fig = _figure()
    ax = fig.add_subplot()
    ax.axhline(y.mean(), color="#9ca3af", linestyle="--", linewidth=1,
               label=f"prevalence ({y.mean():.2f})")
    ax.step(recall, precision, where="post", color=POS_COLOUR, linewidth=2,
            label=f"model (AP {_f(ev.metrics['average_precision']['value'])})")
    _mark_points(ax, ev.metrics, lambda p: (p["sensitivity"], p["precision"]))
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="recall (sensitivity)",
           ylabel="precision (PPV)", title="Precision-recall curve")
    ax.legend(loc="lower left", fontsize=8, frameon=True, framealpha=0.9, edgecolor="#e5e7eb")
    _style(ax)
    return _png(fig)


def reliability_figure(ev: Evaluation) -> str:
    from matplotlib.ticker import MaxNLocator

    curve = ev.metrics["calibration"]["reliability_curve"]
    fig = _figure(5.0, 5.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    filled = [r for r in curve if r["count"]]
    top.plot([0, 1], [0, 1], color="#9ca3af", linestyle="--", linewidth=1,
             label="perfect calibration")
    top.plot([r["mean_predicted"] for r in filled], [r["fraction_positive"] for r in filled],
             marker="o", color=POS_COLOUR, linewidth=2, label="model (10 bins)")
    top.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel=f"observed fraction '{ev.positive_class}'",
            title="Reliability curve")
    top.legend(loc="upper left", fontsize=8, frameon=False)
    centres = [(r["lower"] + r["upper"]) / 2 for r in curve]
    bottom.bar(centres, [r["count"] for r in curve], width=0.09, color="#9ca3af")
    bottom.set(xlabel="predicted probability", ylabel="images")
    bottom.yaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
    for ax in (top, bottom):
        _style(ax)
    return _png(fig)


def histogram_figure(ev: Evaluation) -> str:
    from matplotlib.ticker import MaxNLocator

    y, s = ev.arrays()
    neg = next(c for c in ev.class_names if c != ev.positive_class)
    fig = _figure(5.0, 4.4)
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 26)
    for mask, label, colour in ((y == 0, neg, NEG_COLOUR), (y == 1, ev.positive_class, POS_COLOUR)):
        ax.hist(s[mask], bins=bins, color=colour, alpha=0.4, label=f"true {label} ({mask.sum()})")
        ax.hist(s[mask], bins=bins, color=colour, histtype="step", linewidth=1.5)
    for name, p in ev.metrics["operating_points"].items():
        ax.axvline(p["threshold"], color=POINT_STYLE[name]["color"], linestyle=":", linewidth=1.5,
                   label=_short_title(name, p))
    ax.set(xlim=(0, 1), xlabel=f"predicted probability of '{ev.positive_class}'",
           ylabel="images", title="Scores by true class")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    _style(ax)
    return _png(fig)


# ---- HTML --------------------------------------------------------------------------------

CSS = """
:root { --ink:#1f2937; --muted:#6b7280; --line:#e5e7eb; --bg:#f3f5f8; --accent:#1e3a5f; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background:var(--accent); color:#fff; padding:22px 0; }
header .in, main { max-width:1120px; margin:0 auto; padding-left:32px; padding-right:32px; }
header .brand { font-size:12px; letter-spacing:.12em; text-transform:uppercase; opacity:.7; }
header h1 { margin:2px 0 4px; font-size:22px; font-weight:600; }
header p { margin:0; opacity:.85; font-size:13px; }
main { padding-top:24px; padding-bottom:32px; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:18px 22px;
  margin:0 0 20px; }
h2 { font-size:16px; margin:0 0 12px; color:var(--accent); }
.cards { display:grid; grid-template-columns:repeat(5, 1fr); gap:12px; margin:0 0 20px; }
.card { background:#fff; border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
.card .k { color:var(--muted); font-size:11px; text-transform:uppercase; letter-spacing:.05em; }
.card .v { font-size:26px; font-weight:600; line-height:1.3; }
.card .ci { color:var(--muted); font-size:12px; }
.warn { background:#fff7ed; border:1px solid #fdba74; color:#9a3412; border-radius:8px;
  padding:10px 14px; margin:0 0 20px; }
table { border-collapse:collapse; font-variant-numeric:tabular-nums; width:100%; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); text-align:right;
  vertical-align:top; }
thead th { font-weight:600; color:var(--muted); font-size:12px;
  border-bottom:2px solid var(--line); }
th:first-child, td:first-child { text-align:left; padding-left:0; }
tbody tr:last-child td, tbody tr:last-child th { border-bottom:none; }
tr.total td { font-weight:600; border-top:2px solid var(--line); }
.ci { color:var(--muted); white-space:nowrap; }
.kv td { text-align:left; }
.kv td:first-child { color:var(--muted); width:34%; }
.grid2 { display:grid; grid-template-columns:1fr 1fr; gap:20px; align-items:start; }
.grid2 > section { margin:0; }
.row { margin:0 0 20px; }
.fig img { display:block; width:100%; height:auto; }
.cm th[scope=row] { text-align:left; color:var(--ink); font-weight:600; font-size:13px;
  vertical-align:middle; }
table.narrow { max-width:560px; }
.cm td.cell { text-align:center; font-size:18px; font-weight:600; padding:12px 6px; }
.cm td.cell small { display:block; font-size:11px; font-weight:400; opacity:.85; }
.cm th.axis { text-align:center; color:var(--muted); font-weight:400; font-size:12px; }
.mono { font-family:ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:12px;
  word-break:break-all; }
.failed td, .failed th { text-align:left; }
.note { color:var(--muted); font-size:12px; margin:10px 0 0; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:0 0 24px; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _table(head: list[str], rows: list[list[str]], cls: str = "",
           row_classes: list[str] | None = None) -> str:
    """Cells are HTML already (escape before); the header is escaped here."""
    h = "".join(f"<th>{_e(c)}</th>" for c in head)
    row_classes = row_classes or [""] * len(rows)
    body = "".join(f'<tr class="{rc}">' + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
                   for r, rc in zip(rows, row_classes))
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _kv(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _card(key: str, value: str, sub: str = "") -> str:
    return (f'<div class="card"><div class="k">{_e(key)}</div><div class="v">{_e(value)}</div>'
            f'<div class="ci">{_e(sub)}&nbsp;</div></div>')


def _ci_cell(ci: dict[str, Any] | None) -> str:
    return f'<span class="ci">{_e(_ci(ci))}</span>'


def _confusion_html(m: dict[str, Any]) -> str:
    cm = m["confusion_matrix"]
    labels, mat = cm["labels"], np.array(cm["matrix"])
    head = (f'<tr><th></th><th class="axis" colspan="{len(labels)}">predicted</th></tr>'
            '<tr><th>true</th>' + "".join(f'<th class="axis">{_e(c)}</th>' for c in labels)
            + "</tr>")
    body = ""
    for i, c in enumerate(labels):
        total = mat[i].sum()
        cells = ""
        for j in range(len(labels)):
            share = mat[i, j] / total if total else 0.0
            colour = "30,58,95" if i == j else "192,57,43"  # correct: navy; errors: red
            ink = "#fff" if share > 0.5 else "var(--ink)"
            cells += (f'<td class="cell" style="background:rgba({colour},{0.06 + 0.8 * share:.2f});'
                      f'color:{ink}">{mat[i, j]}<small>{share:.1%} of true {_e(c)}</small></td>')
        body += f'<tr><th scope="row">{_e(c)}</th>{cells}</tr>'
    return f'<table class="cm"><thead>{head}</thead><tbody>{body}</tbody></table>'


def _points_html(m: dict[str, Any]) -> str:
    points = m["operating_points"]
    boot = m["bootstrap"]
    span = 2 if boot else 1
    top = "<tr><th></th>" + "".join(f'<th colspan="{span}" style="text-align:center">'
                                    f'{_e(_point_title(n, p))}</th>' for n, p in points.items())
    sub = "<tr><th>metric</th>" + "".join(
        "<th>value</th>" + (f"<th>{int(boot['level'] * 100)}% CI</th>" if boot else "")
        for _ in points) + "</tr>"
    body = ""
    for key, label in POINT_LABELS.items():
        body += f"<tr><td>{_e(label)}</td>"
        for p in points.values():
            body += f"<td>{_f(p[key])}</td>"
            if boot:
                ci = p.get("ci", {}).get(key) if key in CI_METRICS else None
                body += f"<td>{_ci_cell(ci)}</td>"
        body += "</tr>"
    body += "<tr><td>TP / FP / TN / FN</td>" + "".join(
        f"<td>{p['tp']} / {p['fp']} / {p['tn']} / {p['fn']}</td>" + ("<td></td>" if boot else "")
        for p in points.values()) + "</tr>"
    return f"<table><thead>{top}</tr>{sub}</thead><tbody>{body}</tbody></table>"


def _classification_html(m: dict[str, Any]) -> str:
    rep = m["classification_report"]
    rows, classes = [], []
    for key in list(m["confusion_matrix"]["labels"]) + ["accuracy", "macro avg", "weighted avg"]:
        if key == "accuracy":
            rows.append(["accuracy", "", "", _f(rep["accuracy"]),
                         str(int(rep["macro avg"]["support"]))])
            classes.append("total")
            continue
        v = rep[key]
        rows.append([_e(key), _f(v["precision"]), _f(v["recall"]), _f(v["f1-score"]),
                     str(int(v["support"]))])
        classes.append("")
    return _table(["class", "precision", "recall", "F1", "support"], rows, row_classes=classes)


def _score_summary_html(ev: Evaluation) -> str:
    y, s = ev.arrays()
    neg = next(c for c in ev.class_names if c != ev.positive_class)
    rows = []
    for mask, label in ((y == 1, ev.positive_class), (y == 0, neg)):
        if not mask.any():  # a one-class evaluation
            rows.append([_e(label), "0"] + ["n/a"] * 6)
            continue
        q = np.percentile(s[mask], [5, 25, 50, 75, 95])
        rows.append([_e(label), str(int(mask.sum())), _f(float(s[mask].mean()))]
                    + [_f(float(v)) for v in q])
    return _table(["true class", "images", "mean", "p5", "p25", "median", "p75", "p95"], rows)


def render_html(ev: Evaluation) -> str:
    """The whole report as one HTML document with everything inline."""
    m = ev.metrics
    model, data, boot = m["model"], m["data"], m["bootstrap"]
    at = m["operating_points"]["model"]
    ci = at.get("ci", {})
    level = f"{int(boot['level'] * 100)}% CI" if boot else ""
    created = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")

    def ci_sub(c: dict[str, Any] | None) -> str:
        return f"{level} {_ci(c)}" if boot and c else ""

    cards = "".join([
        _card("studies" if _unit(data) == "study" else "images", str(data["files"]),
              f"{data['unreadable']} unreadable" if data["unreadable"] else "all readable"),
        _card("ROC-AUC", _f(m["roc_auc"]["value"]), ci_sub(m["roc_auc"]["ci"])),
        _card(f"sensitivity @ {_f(at['threshold'])}", _f(at["sensitivity"]),
              ci_sub(ci.get("sensitivity"))),
        _card(f"specificity @ {_f(at['threshold'])}", _f(at["specificity"]),
              ci_sub(ci.get("specificity"))),
        _card(f"accuracy @ {_f(at['threshold'])}", _f(at["accuracy"]),
              ci_sub(ci.get("accuracy"))),
    ])
    warn = (f'<div class="warn"><b>{data["unreadable"]} of {data["files"]} files could not be '
            f'read.</b> The metrics are computed on the {data["readable"]} readable files; the '
            f'unreadable ones are listed at the end.</div>' if data["unreadable"] else "")
    copies = m.get("training_copies") or {}
    if copies.get("exact") or copies.get("near"):
        warn += f'<div class="warn"><b>Training copies.</b> {_e(copies_sentence(m))}</div>'

    # The same readable rows as `fxscore info` (fxscore.info), not the raw metadata.
    model_rows = [(label, _e(text)) for label, text in model_pairs(model)]
    if (m.get("threshold") or {}).get("source") == "--threshold":
        model_rows = [(k, v if k != "threshold" else _e(_threshold_text(m).split(" ", 1)[1]))
                      for k, v in model_rows]

    class_rows = [[_e(c), str(v["files"]), str(v["readable"]), str(v["unreadable"])]
                  for c, v in data["per_class"].items()]
    class_rows.append(["total", str(data["files"]), str(data["readable"]), str(data["unreadable"])])
    data_kv = [("folder", f'<span class="mono">{_e(data["root"])}</span>'),
               ("labels from", f'<span class="mono">{_e(data["labels_csv"])}</span>'
                if data["source"] == "labels" else "one folder per class")]
    if _unit(data) == "study":
        data_kv.append(("unit", _e(study_sentence(m))))
    if data.get("groups_csv"):
        data_kv.append(("groups", f'{data["groups"]} groups from '
                                  f'<span class="mono">{_e(data["groups_csv"])}</span>'))
    if data.get("ignored"):
        data_kv.append(("ignored", f'{data["ignored"]} non-image file(s) in the class folders'))
    if copies_sentence(m):
        data_kv.append(("training copies", _e(copies_sentence(m))))
    if ood_sentence(m):
        data_kv.append(("OOD flag", _e(ood_sentence(m))))

    rank_rows = [[label, _f(m[k]["value"]), _ci_cell(m[k]["ci"])] for k, label in
                 (("roc_auc", "ROC-AUC"), ("average_precision", "Average precision"))]
    cal = m["calibration"]
    cal_rows = [[f"{r['lower']:.1f} – {r['upper']:.1f}", str(r["count"]), _f(r["mean_predicted"]),
                 _f(r["fraction_positive"])] for r in cal["reliability_curve"]]
    if boot:
        valid = m["roc_auc"]["ci"]["valid"]
        boot_note = (f"{level}: percentile bootstrap, {boot['n_resamples']} resamples (seed "
                     f"{boot['seed']}), resampling "
                     + (f"whole groups ({boot['clusters']} groups)" if boot["grouped"]
                        else "images")
                     + (f"; ROC-AUC was defined in {valid} of them (the others drew one class "
                        "only)" if valid < boot["n_resamples"] else "")
                     + ". Thresholds are held fixed, so the intervals leave out the uncertainty "
                       "of choosing a threshold on this same data.")
    else:
        boot_note = "No confidence intervals (--bootstrap 0)."

    failed = m["unreadable_files"]
    failed_html = (_table(["file", "true class", "error"],
                          [[f'<span class="mono">{_e(f["path"])}</span>', _e(f["true_label"]),
                            _e(_reason(f))] for f in failed], "failed")
                   if failed else "<p>Every file could be read.</p>")
    target_note = (" The target threshold is the highest threshold whose sensitivity on this "
                   "data reaches the target." if "target" in m["operating_points"] else "")

    def fig(src: str, alt: str) -> str:
        return f'<div class="fig"><img alt="{_e(alt)}" src="{src}"></div>'

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fxscore evaluation: {_e(model['model_name'])} on {_e(Path(data['root']).name)}</title>
<style>{CSS}</style></head>
<body>
<header><div class="in"><div class="brand">fxscore evaluation report</div>
<h1>{_e(model['model_name'])}, version {_e(model['model_version'])}, on {_e(Path(data['root']).name)}</h1>
<p>model {_e(model['model_id'])} &middot; {data['files']} files &middot; positive class
'{_e(m['positive_class'])}' &middot; {_e(created)}</p></div></header>
<main>
<div class="cards">{cards}</div>
{warn}
<div class="grid2 row">
<section><h2>Model</h2>{_kv(model_rows)}</section>
<section><h2>Data</h2>{_kv(data_kv)}
<div style="height:12px"></div>
{_table(["class", "files", "readable", "unreadable"], class_rows,
        row_classes=[""] * (len(class_rows) - 1) + ["total"])}</section>
</div>
<section><h2>Operating points</h2>{_points_html(m)}
<p class="note">An image is called '{_e(m['positive_class'])}' when its probability is at or
above the threshold.{target_note} {_e(boot_note)}</p></section>
<div class="grid2 row">
<section><h2>Confusion matrix</h2>{_confusion_html(m)}
<p class="note">At the {_e(_threshold_text(m))}; rows are the true classes.</p>
</section>
<section><h2>Classification report</h2>{_classification_html(m)}
<p class="note">scikit-learn's classification report at the model threshold.</p></section>
</div>
<section><h2>Discrimination</h2>{_table(["metric", "value", level], rank_rows, "narrow")}
<div class="grid2" style="margin-top:14px">{fig(roc_figure(ev), "ROC curve")}
{fig(pr_figure(ev), "precision-recall curve")}</div>
<p class="note">Markers: the operating points of the table above.</p></section>
<section><h2>Calibration</h2>
<div class="grid2"><div>{fig(reliability_figure(ev), "reliability curve")}</div>
<div>{_table(["metric", "value"], [["Brier score", _f(cal["brier"])],
                                   ["Expected calibration error",
                                    _f(cal["expected_calibration_error"])]])}
<div style="height:14px"></div>
{_table(["probability bin", "images", "mean predicted", "observed"], cal_rows)}</div></div>
<p class="note">Observed = fraction of '{_e(m['positive_class'])}' among the images in the bin.
A calibrated model lies on the diagonal.</p></section>
<section><h2>Score distributions</h2>
<div class="grid2"><div>{fig(histogram_figure(ev), "score histograms per class")}</div>
<div>{_score_summary_html(ev)}
<p class="note">Predicted probability of '{_e(m['positive_class'])}' by true class
(p5..p95: percentiles).</p></div></div></section>
{getattr(ev, "gallery_html", "")}
<section><h2>Files that could not be read ({len(failed)})</h2>{failed_html}</section>
</main>
<footer>fxscore {_e(__version__)} &middot; all figures and styles are inside this file</footer>
</body></html>
"""
