"""Class activation maps in numpy: where in the image the model found evidence for its class.

    ex = explain_file(model, "knee.png")       # model with heatmap outputs (fxscore augment)
    ex.probability, ex.cells                   # cells: the raw map, one value per feature cell
    write_png("knee.heatmap.png", ex.overlay, row_path="knee.png")

For a network that ends in global average pooling and one linear layer (ResNet18), the logit
is the average over the last feature map's cells of sum_k w_k A_k(cell), plus the bias: the
class activation map (Zhou et al., 2016) is that sum per cell, computed here from the graph's
`feature_map` output and the head's weights stored in the contract (`cam`). It is exact for
this head (no gradients, no approximation): the cells average to logit - bias.

Shown: the positive part of the map (evidence *for* the positive class, e.g. "fractured"),
divided by its maximum, upsampled to the image with the one resize function of
`fxscore.preprocess` (bilinear) and blended over the radiograph with a small colour map; the
blend is transparent where the map is 0, so the radiograph stays readable. A map without any
positive cell is shown as no heat at all.

Coarse by construction: the map has one cell per 32 x 32 input pixels of ResNet18, 7 x 7
cells at 224 px and 4 x 4 at 128 px, so on a 128 px model each cell covers a quarter of the
image's width; it says which region, not which line or pixel. The network sees the whole
image (no crop), stretched or padded to square by the model's fit rule; the cells are mapped
back through the same box (`upsample`), so they land where the image lay in the input.

Heatmap files of a run (`HeatmapWriter`) are named after the row's path (`heatmap_name`,
reversible) and carry that path in a PNG text chunk; they are derived patient images.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from .graph_outputs import FEATURE_MAP, OOD_SCORE, PROBABILITY, has_roles, require
from .preprocess import content_box, resize

if TYPE_CHECKING:
    from .contract import Preprocess
    from .model import Model

MAX_SIDE = 1024  # overlays are written at the image's size, at most this many pixels a side
ALPHA = 0.6  # opacity of the colour where the map is hottest
PNG_TEXT_KEY = "fxscore-path"  # the row's path, inside every heatmap PNG
SUFFIX = ".png"
# NAME_MAX is 255 bytes on Linux, macOS and Windows file systems; the atomic write needs room
# for its temporary name (".NAME.fxscore-tmp") beside the file.
MAX_NAME_BYTES = 240
WHICH = ("positive", "all")
# The colour map: dark purple -> red -> yellow -> near white (close to matplotlib's
# "inferno", which is perceptually ordered and readable by colour-blind people), as control
# points interpolated linearly; importing matplotlib would take longer than a heatmap.
_STOPS = np.array([0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0])
_COLOURS = np.array([[0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
                     [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164]],
                    dtype=np.float64)


# ---------------------------------------------------------------------------- the map


def cam_cells(feature_map: np.ndarray, weights: np.ndarray | list[float]) -> np.ndarray:
    """sum_k w_k A_k per cell: feature map [K, h, w] -> [h, w] (float64)."""
    a = np.asarray(feature_map, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if a.ndim != 3 or a.shape[0] != len(w):
        raise ValueError(f"feature map {a.shape} does not fit {len(w)} head weights")
    return np.tensordot(w, a, axes=1)


def normalise(cells: np.ndarray) -> np.ndarray:
    """ReLU, then divide by the maximum -> [0, 1]; all zeros when no cell is positive."""
    pos = np.maximum(np.asarray(cells, dtype=np.float64), 0.0)
    top = float(pos.max()) if pos.size else 0.0
    return pos / top if top > 0 else np.zeros_like(pos)


def map_to_image(cells: np.ndarray, shape: tuple[int, int],
                 params: "Preprocess | None" = None) -> np.ndarray:
    """Any map over the network input's cells -> the image's (height, width), float32.

    For a model that pads (`params.fit == "pad"`) the map is first brought to the input size
    and cut to the box the image filled there, so each cell lands where that part of the image
    lay in the input (stretching the whole map would shift it by the borders). Resized with
    fxscore's one resize (bilinear).
    """
    cells = np.asarray(cells, dtype=np.float32)
    if params is not None and params.fit != "stretch":
        top, left, h, w = content_box(shape, params)
        cells = resize(cells, params.input_size, "bilinear")[top:top + h, left:left + w]
    return resize(cells, shape, "bilinear")


def upsample(heat: np.ndarray, shape: tuple[int, int],
             params: "Preprocess | None" = None) -> np.ndarray:
    """A [0, 1] map of cells -> the image's (height, width), still in [0, 1]."""
    return np.clip(map_to_image(heat, shape, params), 0.0, 1.0)


def colour_map(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB, shape (..., 3)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Grey image (H, W) in [0, 1] + heat (H, W) in [0, 1] -> uint8 RGB (H, W, 3).

    The colour's opacity grows with the heat, so where the map is 0 the radiograph is shown
    as it is.
    """
    if image.shape != heat.shape:
        raise ValueError(f"image {image.shape} and heat {heat.shape} differ in shape")
    grey = np.clip(np.asarray(image, dtype=np.float64), 0, 1)[..., None] * 255.0
    a = alpha * np.clip(heat, 0, 1)[..., None]
    out = (1 - a) * grey + a * colour_map(heat).astype(np.float64)
    return np.round(out).astype(np.uint8)


def display_image(image: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """The image scaled down (never up) to at most `max_side` pixels a side."""
    h, w = image.shape
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return np.asarray(image, dtype=np.float32)
    return resize(image, (max(1, round(h * scale)), max(1, round(w * scale))), "bilinear")


# ---------------------------------------------------------------------------- one file


@dataclass
class Explanation:
    probability: float
    label: str
    cells: np.ndarray  # raw CAM [h, w]: sum_k w_k A_k, its mean is logit - bias
    heat: np.ndarray  # normalised and upsampled to `image`, [0, 1]
    image: np.ndarray  # the radiograph as shown, (H, W) in [0, 1]
    overlay: np.ndarray  # uint8 RGB (H, W, 3)
    sha256: str
    ood_score: float | None = None
    ood: bool | None = None

    @property
    def peak_cell(self) -> tuple[int, int]:
        """(row, column) of the hottest cell."""
        r, c = np.unravel_index(int(np.argmax(self.cells)), self.cells.shape)
        return int(r), int(c)


def explain_bytes(model: "Model", data: bytes, *, name: str = "image",
                  max_side: int = MAX_SIDE) -> Explanation:
    """One file's bytes -> its score (read exactly as `fxscore run` reads it) and heatmap."""
    from .images import read_image
    from .scoring import model_input, model_input_with_colour

    require(model, (FEATURE_MAP,), "a heatmap")
    roles = [PROBABILITY, FEATURE_MAP]
    if model.meta.ood and has_roles(model, (OOD_SCORE,)):
        roles.append(OOD_SCORE)
    # the same flag as `fxscore run`'s, the colour rule included, from the same decode
    if OOD_SCORE in roles:
        x, colour = model_input_with_colour(io.BytesIO(data), model.meta.preprocess, name=name)
    else:
        x, colour = model_input(io.BytesIO(data), model.meta.preprocess, name=name), False
    out = model.predict_with(x[None], tuple(roles))
    p = float(out[PROBABILITY][0])
    cells = cam_cells(out[FEATURE_MAP][0], model.meta.cam["weights"])
    shown = display_image(read_image(io.BytesIO(data), name=name, min_size=(max_side, max_side)),
                          max_side)
    heat = upsample(normalise(cells), shown.shape, model.meta.preprocess)
    score = flag = None
    if OOD_SCORE in out:
        from .ood import ood_cells

        score, flag = ood_cells(float(out[OOD_SCORE][0]), float(model.meta.ood["threshold"]),
                                colour)
    return Explanation(probability=p, label=model.label(p), cells=cells, heat=heat,
                       image=shown, overlay=overlay(shown, heat),
                       sha256=hashlib.sha256(data).hexdigest(), ood_score=score, ood=flag)


def explain_file(model: "Model", path: str | os.PathLike, *,
                 max_side: int = MAX_SIDE) -> Explanation:
    """`explain_bytes` on a file, opened like `fxscore run` opens it (regular files only)."""
    from .images import open_regular

    with open_regular(Path(path)) as f:
        data = f.read()
    return explain_bytes(model, data, name=str(path), max_side=max_side)


def png_bytes(rgb: np.ndarray, row_path: str | None = None) -> bytes:
    """An RGB uint8 array as PNG bytes, the row's path in a text chunk (byte-escaped)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if row_path is not None:
        from .csvsafe import escape_bytes

        info.add_itxt(PNG_TEXT_KEY, escape_bytes(row_path))
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", pnginfo=info, compress_level=6)
    return buf.getvalue()


def write_png(path: str | os.PathLike, rgb: np.ndarray, row_path: str | None = None) -> Path:
    """Write an overlay atomically (complete or absent, never half a PNG)."""
    from .atomicfile import write_files

    return write_files({Path(path): png_bytes(rgb, row_path)})[0]


# ---------------------------------------------------------------------------- file names

_SAFE = re.compile(rb"[A-Za-z0-9._-]")
_HASHED = "~"  # never produced by escaping: marks a name shortened with a hash


def heatmap_name(row_path: str) -> str:
    """The heatmap file name for a row's path: one flat, collision-free, reversible name.

    Every byte of the path (as the file system gave it, `os.fsencode`) outside
    [A-Za-z0-9._-] is written %XX, '/' included, so the whole tree maps into one folder,
    no two paths give one name, and `row_path_of` undoes it; a leading '.' is escaped too (no
    hidden files). A name that would exceed MAX_NAME_BYTES (240) is cut and ends in '~' and 16 hex
    digits of the path's sha256 instead: still unique (to 64 bits), not reversible from the
    name; the PNG's text chunk holds the path either way.
    """
    raw = os.fsencode(row_path)
    out = []
    for i, b in enumerate(raw):
        c = bytes([b])
        out.append(c.decode("ascii") if _SAFE.fullmatch(c) and not (i == 0 and c == b".")
                   else f"%{b:02X}")
    name = "".join(out) + SUFFIX
    if len(name) > MAX_NAME_BYTES:
        digest = hashlib.sha256(raw).hexdigest()[:16]
        keep = MAX_NAME_BYTES - len(SUFFIX) - 1 - len(digest)
        head = "".join(out)[:keep]
        head = head[:head.rfind("%")] if "%" in head[-2:] else head  # no cut escape
        name = f"{head}{_HASHED}{digest}{SUFFIX}"
    return name


def row_path_of(name: str) -> str | None:
    """The row path a heatmap name came from; None for a hashed (shortened) name."""
    if not name.endswith(SUFFIX) or _HASHED in name:
        return None
    stem = name[:-len(SUFFIX)]
    raw = re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), stem)
    return os.fsdecode(raw.encode("latin-1"))


# ---------------------------------------------------------------------------- for runs


class HeatmapWriter:
    """Writes one overlay PNG per selected row of a run into `folder`.

    `which`: "positive" (rows labelled the positive class) or "all" (every scored row).
    Rows come from scoring with "_feature_map" (this row's [K, h, w]) and "_file" (the path
    scored); the file is read again for display and must still hash to the row's sha256
    (otherwise no heatmap is written and `warn` says why). Call `write(rows)` *before* the
    rows are appended to --out: a row in --out then always has its heatmap, so a resumed run
    (which skips rows already in --out) never leaves one missing.
    """

    def __init__(self, folder: str | os.PathLike, model: "Model", which: str = "positive", *,
                 workers: int = 1, max_side: int = MAX_SIDE,
                 warn: Callable[[str], None] | None = None) -> None:
        if which not in WHICH:
            raise ValueError(f"which must be one of {WHICH}, got {which!r}")
        require(model, (FEATURE_MAP,), "--heatmaps")
        self.folder = Path(folder)
        self.model, self.which, self.max_side = model, which, max_side
        self.weights = np.asarray(model.meta.cam["weights"], dtype=np.float64)
        self.workers = max(1, workers)
        self.warn = warn or (lambda message: None)
        self.written = 0
        self.skipped = 0
        self.folder.mkdir(parents=True, exist_ok=True)

    roles = (FEATURE_MAP,)

    def wanted(self, row: dict[str, Any]) -> bool:
        if row.get("probability") is None or row.get("_feature_map") is None:
            return False
        return self.which == "all" or row["label"] == self.model.meta.positive_class

    def path_for(self, row_path: str) -> Path:
        return self.folder / heatmap_name(row_path)

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        todo = [r for r in rows if self.wanted(r)]
        if not todo:
            return
        if self.workers == 1 or len(todo) == 1:
            results = [self._one(r) for r in todo]
        else:
            with ThreadPoolExecutor(min(self.workers, len(todo)),
                                    thread_name_prefix="fxscore-heatmap") as pool:
                results = list(pool.map(self._one, todo))
        for message in results:
            if message is None:
                self.written += 1
            else:
                self.skipped += 1
                self.warn(message)

    def _one(self, row: dict[str, Any]) -> str | None:
        from .images import ImageReadError, open_regular, read_image

        try:
            with open_regular(Path(row["_file"])) as f:
                data = f.read()
        except (OSError, ImageReadError) as e:
            return f"no heatmap for {row['path']}: it cannot be read again ({e})"
        if row.get("sha256") and hashlib.sha256(data).hexdigest() != row["sha256"]:
            return f"no heatmap for {row['path']}: the file changed while it was scored"
        try:
            shown = display_image(read_image(io.BytesIO(data), name=row["path"],
                                             min_size=(self.max_side, self.max_side)),
                                  self.max_side)
        except ImageReadError as e:
            return f"no heatmap for {row['path']}: {e}"
        heat = upsample(normalise(cam_cells(row["_feature_map"], self.weights)), shown.shape,
                        self.model.meta.preprocess)
        write_png(self.path_for(row["path"]), overlay(shown, heat), row_path=row["path"])
        return None
