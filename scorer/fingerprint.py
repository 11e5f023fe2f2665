"""Fingerprints of images: exact (sha256 of the bytes) and near-duplicate (what the pixels show).

Public fracture data sets hold the same radiograph many times: re-encoded, resized (often
stretched to 224 x 224), flipped, turned by 90 degrees, rotated by a few degrees, slightly
cropped, brighter or darker. X-rays of the same body part look alike when small, so finding the
copies takes three steps (the grouping of verified pairs is `fxscore.grouping`'s):

1. Candidates. Every image becomes a 128 x 128 grey thumbnail (squashed: see `thumbnail`). The
   6 x 6 lowest DCT frequencies of it and of its central 75 %, at 32 x 32, zero mean, unit
   length, are a descriptor whose dot product is the correlation of two heavily blurred images:
   blind to brightness/contrast, resizing and re-encoding, tolerant of small shifts. Flips and
   90 degree turns only permute signs and axes of DCT coefficients, so the 8 orientations cost
   one DCT. Blocked matrix products give each image its 6 closest others, and 3 more by its
   descriptors turned by +-10 degrees and zoomed about each corner and edge (`turned_queries`):
   among look-alikes a rotated or cropped copy can otherwise rank 40th.
2. Alignment. A candidate pair is aligned (orientation, rotation up to +-15 degrees in either
   image's frame, x and y scale, shift) and compared by normalised cross-correlation of
   band-passed thumbnails, coarse to fine (32, 64, 128 px), rejecting look-alikes early.
   Band-passing keeps edges and trabecular texture, which differ between two films of the same
   wrist even when their silhouettes agree. A pair above MATCH_SCORE is a candidate copy.
3. Confirmation. Edges alone cannot tell two drawings of one shape apart: independently drawn
   phantoms of a long bone (and radiographs with little texture) align to a band-pass
   correlation of 0.98, higher than a cropped copy's 0.85. So the alignment is refined to a
   fraction of a pixel (Gauss-Newton on angle, x and y scale, shift), and the question becomes
   whether one image is a *function* of the other, pixel by pixel (`_residual`): what is left
   of the first after the best intensity mapping of the second (the mean per grey level, which
   absorbs any brightness, contrast or gamma change and clipping), blurred, as a fraction of
   the first's spread. Planted copies of every kind leave <= 0.05 (resampling, 8-bit
   rounding); independently drawn phantoms of one shape >= 0.06, other films of one wrist
   >= 0.065 (most 0.1 to 0.3). Between them, MAX_RESIDUAL. Copies the public data set turned by
   ~20 degrees and re-contrasted locally reach 0.05 to 0.13 against each other: those pairs
   are not confirmed, and their films still form one group through the less edited copies.

The thresholds were calibrated on the real data set, on planted copies and on independently
drawn phantoms: benchmarks/bench_audit.py measures precision and recall on them, and
tests/data/audit_pairs.csv lists real pairs judged by eye.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image
from scipy import fft as sp_fft, ndimage  # scipy comes with scikit-learn

from .preprocess import float_image

THUMB = 128  # thumbnail side; verification's fine level works at this size
DCT_SIDE = 32  # the candidate descriptor's image side
DCT_K = 6  # keep the K x K lowest frequencies (minus DC)
CANDIDATE_SIM = 0.50  # descriptor similarity for a pair to be verified at all
MATCH_SCORE = 0.75  # band-pass correlation at 128 px after alignment: a candidate copy (step 2)
MAX_RESIDUAL = 0.055  # confirmation (step 3): see the module docstring
RESIDUAL_SIGMA = 3.0  # blur (px at 128) of the residual: resampling noise is finer
MATCH_BLUR = 2.0  # both images blurred alike first: a resized or rotated copy is softer
MAX_NEIGHBOURS = 6  # candidates per image, best first: copies rank first, bounded work
MAX_TURNED = 3  # more per image by its turned and zoomed descriptors (`turned_queries`)
MAX_ORIENTS = 3  # orientations tried first (near-symmetric images rank several alike)
REFINE_ITERS = 12  # Gauss-Newton steps of the confirmation (copies converge in 3-6)
PROMISING = 3.0  # a failed confirmation this close (x MAX_RESIDUAL) tries other orientations
ANGLES = (-15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0)
SCALES = (0.9, 1.0, 1.1)
PRESCREEN = 0.55  # 32 px correlation that copies exceed (calibrated: >= 0.69 for every
#                   planted kind, >= 0.9 for the real set's copies; 80 % of look-alikes fail)
HOPELESS = 0.5  # 64 px correlation below which the 128 px one never reached MATCH_SCORE
CLEAR = 0.9  # 32 px correlation above which no other orientation is tried (unless the
#             confirmation fails: a symmetric bone matches itself turned by 180 degrees)

# ---------------------------------------------------------------------------- exact

from .hashing import sha256_file  # noqa: E402,F401 - one definition, re-exported here


# ---------------------------------------------------------------------------- thumbnails

def thumbnail(img: np.ndarray, size: int = THUMB) -> np.ndarray:
    """(H, W) float image -> (size, size) uint8: the whole image squashed to a square,
    area-averaged, stretched to its own min..max.

    Squashed, because that is how copies are made: public data sets resize every image to
    224 x 224 whatever its shape, then rotate and crop the square. A rotation made in a
    non-square frame becomes a sheared rotation here; `match` knows each frame's aspect ratio
    and searches for exactly that. Stretching keeps 16-bit images with a narrow range from
    collapsing into a few grey levels.
    """
    small = np.asarray(float_image(img).resize((size, size), Image.BOX), dtype=np.float32)
    lo, hi = float(small.min()), float(small.max())
    if hi - lo < 1e-12:
        return np.zeros((size, size), np.uint8)
    return np.round((small - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _dct_matrix(n: int, k: int) -> np.ndarray:
    x = np.arange(n)
    u = np.arange(k)[:, None]
    m = np.cos(np.pi * (2 * x + 1) * u / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m.astype(np.float32)


_DCT = _dct_matrix(DCT_SIDE, DCT_K)
_SIGN = (-1.0) ** np.arange(DCT_K, dtype=np.float32)


def descriptors(thumb: np.ndarray) -> np.ndarray:
    """(THUMB, THUMB) thumbnail -> (8, 2*(K*K-1)) float32: unit descriptors of its 8 orientations.

    Two views, averaged by the dot product: the whole thumbnail, and its central 75 % (which a
    rotated copy's black corners and a cropped copy's lost margins do not reach). Row o
    describes `dihedral(thumb, o)`: DCT-II of a flipped axis multiplies frequency u by (-1)^u,
    and transposing the image transposes the coefficients.
    """
    t = thumb.astype(np.float32)
    n = t.shape[0]
    m = n * 3 // 4
    o = (n - m) // 2
    views = [_block_mean(t, DCT_SIDE), _block_mean(t[o:o + m, o:o + m], DCT_SIDE)]
    out = np.empty((8, 2, DCT_K * DCT_K), np.float32)
    for v, s in enumerate(views):
        c = _DCT @ (s - s.mean()) @ _DCT.T
        for o in range(8):
            x = c.T if o & 4 else c
            if o & 2:
                x = x * _SIGN[:, None]
            if o & 1:
                x = x * _SIGN[None, :]
            out[o, v] = x.ravel()
    out = out[:, :, 1:]  # drop DC: zero after removing the mean
    out /= np.maximum(np.linalg.norm(out, axis=2, keepdims=True), 1e-12) * math.sqrt(2)
    return out.reshape(8, -1)


def _block_mean(x: np.ndarray, side: int) -> np.ndarray:
    """Square image -> float32 (side, side), each pixel the mean of the area it covers."""
    x = x.astype(np.float32, copy=False)
    if x.shape[0] % side == 0:
        f = x.shape[0] // side
        return x.reshape(side, f, side, f).mean(axis=(1, 3))
    return np.asarray(float_image(x).resize((side, side), Image.BOX))


def dihedral(x: np.ndarray, o: int) -> np.ndarray:
    """One of the 8 flips/rotations by 90 degrees: bit 4 transpose, then 2 flip rows, 1 columns."""
    if o & 4:
        x = x.T
    if o & 2:
        x = x[::-1]
    if o & 1:
        x = x[:, ::-1]
    return np.ascontiguousarray(x)


# ---------------------------------------------------------------------------- candidates

PAIR = np.dtype([("i", np.int64), ("j", np.int64), ("sim", np.float32)])


# warps (angle, x scale, y scale, shift y, shift x at 128 px) a query is also described at:
# turned both ways; zoomed about each corner (cropped on two sides) and about each edge's
# middle in one direction (cropped on one side). See `turned_queries`.
_C = (THUMB - 1) / 2
QUERY_WARPS = ((-10.0, 1.0, 1.0, 0.0, 0.0), (10.0, 1.0, 1.0, 0.0, 0.0),
               *((0.0, 1.06, 1.06, dy * 0.06 * _C, dx * 0.06 * _C)
                 for dy in (-1, 1) for dx in (-1, 1)),
               *((0.0, 1.1, 1.0, 0.0, d * 0.1 * _C) for d in (-1, 1)),
               *((0.0, 1.0, 1.1, d * 0.1 * _C, 0.0) for d in (-1, 1)))


def turned_queries(thumb: np.ndarray,
                   warps: Iterable[tuple[float, float, float, float, float]] = QUERY_WARPS,
                   ) -> np.ndarray:
    """(THUMB, THUMB) thumbnail -> (len(warps), D): the descriptor (orientation 0) of the
    thumbnail rotated, zoomed and shifted by each warp (see `_warps`; zero outside).

    Low frequencies are not blind to rotation or cropping: a bone rotated by 10 degrees is
    described like another bone at that angle, and among look-alikes (phantoms of one long
    bone, every film of one wrist view) its original can rank 40th; a copy cropped on one or
    two sides is zoomed about that edge or corner. Searching with the query turned and zoomed
    as well ranks them first.
    """
    # at half size: the descriptor sees 32 x 32 block means, and a quarter of the samples
    half = thumb.shape[0] // 2
    thumb = _block_mean(np.asarray(thumb, np.float32), half)
    yy, xx = _centred_grid(half)
    p = np.array(list(warps), np.float64)
    p[:, 3:] *= half / THUMB
    inv = np.stack([_inverse(angle, sx, sy, 1.0) for angle, sx, sy, _, _ in p])
    inv = inv.astype(np.float32)[:, :, :, None, None]
    u = xx[None] - p[:, 4].astype(np.float32)[:, None, None]
    v = yy[None] - p[:, 3].astype(np.float32)[:, None, None]
    (w,), _ = _gather(np.asarray(thumb, np.float32)[None], inv[:, 0, 0] * u + inv[:, 0, 1] * v,
                      inv[:, 1, 0] * u + inv[:, 1, 1] * v)
    return _upright_descriptors(w)


def _upright_descriptors(images: np.ndarray) -> np.ndarray:
    """(R, THUMB, THUMB) -> (R, D): row 0 of `descriptors` of each image, all at once."""
    n = images.shape[-1]
    m = n * 3 // 4
    o = (n - m) // 2
    r = len(images)
    whole = images.reshape(r, DCT_SIDE, n // DCT_SIDE, DCT_SIDE, n // DCT_SIDE).mean(axis=(2, 4))
    centre = np.stack([_block_mean(x[o:o + m, o:o + m], DCT_SIDE) for x in images])
    out = []
    for view in (whole, centre):
        view = view - view.mean(axis=(1, 2), keepdims=True)
        c = (_DCT @ view @ _DCT.T).reshape(r, -1)[:, 1:]  # drop DC, as `descriptors` does
        out.append(c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12))
    return (np.concatenate(out, axis=1) / math.sqrt(2)).astype(np.float32)


def candidate_pairs(desc: np.ndarray, min_sim: float = CANDIDATE_SIM,
                    max_neighbours: int = MAX_NEIGHBOURS, part: np.ndarray | None = None,
                    queries: np.ndarray | None = None, max_turned: int = MAX_TURNED,
                    ) -> np.ndarray:
    """(N, 8, D) descriptors -> pairs (i < j, sim) to verify, most similar first.

    Each image keeps its `max_neighbours` most similar partners (in any orientation) above
    `min_sim`. Low frequencies alone cannot tell two wrists apart, so a plain threshold would
    pass a large share of all pairs; copies rank first, and a group of copies stays connected
    because every member keeps its closest ones. Blocked matrix products bound the memory.

    queries: (N, R, D) more descriptors of each image to search with (`turned_queries`):
    each image then also keeps its `max_turned` best partners by the best of those. Both
    lists, not one by the best of all: turning finds rotated copies, but it also lets other
    look-alikes come closer, and they would push out a cropped copy.
    part: only partners from another part (split): the pairs that could make a leak. Each
    image's best partners elsewhere include every such pair among its best partners overall.
    """
    n = len(desc)
    if n < 2:
        return np.zeros(0, PAIR)
    q = desc[:, :1] if queries is None else np.concatenate([desc[:, :1], queries], axis=1)
    r = q.shape[1]
    # float64 and rounded: a multi-threaded float32 product differs in the last bits from run
    # to run, and the order of the pairs decides which join first: the groups must not vary
    q = q.astype(np.float64)
    everything = desc.reshape(n * 8, -1).astype(np.float64)
    k = min(max_neighbours, n - 1)
    block = max(1, (1 << 23) // (n * 8 * r))
    parts = []
    for start in range(0, n, block):
        chunk = q[start:start + block]
        sims = (chunk.reshape(-1, q.shape[2]) @ everything.T).reshape(len(chunk), r, n, 8)
        sims = np.round(sims.max(axis=3), 6)
        rows = np.arange(start, start + len(chunk))
        lists = [(sims[:, 0], k)] + ([(sims[:, 1:].max(axis=1), min(max_turned, n - 1))]
                                     if r > 1 else [])
        best = sims.max(axis=1)
        for sim, k in lists:
            sim[np.arange(len(sim)), rows] = -np.inf  # an image is not its own copy
            if part is not None:
                sim[part[rows][:, None] == part[None, :]] = -np.inf
            top = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # ties: the lower index
            keep = np.take_along_axis(sim, top, axis=1) >= min_sim
            parts.append((np.broadcast_to(rows[:, None], top.shape)[keep], top[keep],
                          np.take_along_axis(best, top, axis=1)[keep]))  # the best view
    ii, jj, ss = (np.concatenate(p) for p in zip(*parts))
    pairs = np.zeros(len(ii), PAIR)
    pairs["i"], pairs["j"], pairs["sim"] = np.minimum(ii, jj), np.maximum(ii, jj), ss
    # most similar first, ties in index order; (i, j) found from both ends: keep the first
    pairs = pairs[np.lexsort((pairs["j"], pairs["i"], -pairs["sim"].astype(np.float64)))]
    _, first = np.unique(pairs["i"] * n + pairs["j"], return_index=True)
    return pairs[np.sort(first)]


# ---------------------------------------------------------------------------- alignment

def band_pass(x: np.ndarray, fine: float, coarse: float) -> np.ndarray:
    """Difference of Gaussians: edges and texture, without the silhouette or the exposure."""
    x = x.astype(np.float32)
    return (ndimage.gaussian_filter(x, fine, mode="reflect", truncate=3.0)
            - ndimage.gaussian_filter(x, coarse, mode="reflect", truncate=3.0))


def _warps(x: np.ndarray, params: Iterable[tuple[float, float, float, float]]) -> np.ndarray:
    """x warped about its centre, per (angle in degrees, sx, sy, q); zero outside.

    The forward map is diag(sx, sy) D R(angle) D^-1 with D = diag(1, 1/q): a rotation made in
    a frame of aspect q = height / width, seen in the squashed thumbnail, then scaled. All
    warps in one bilinear gather: per-call overhead, not arithmetic, is what a grid of small
    warps costs.
    """
    p = np.asarray(list(params), np.float64)
    m = np.stack([_inverse(*row) for row in p]).reshape(-1, 4)
    m = m.astype(np.float32)[:, :, None, None]
    n = x.shape[0]
    yy, xx = _centred_grid(n)
    src_x = m[:, 0] * xx + m[:, 1] * yy
    src_y = m[:, 2] * xx + m[:, 3] * yy
    return _gather(x[None], src_x, src_y)[0][0]


def _inverse(angle: float, sx: float, sy: float, q: float) -> np.ndarray:
    """The 2 x 2 inverse of a warp's forward map (output -> input, (x, y) centred coordinates):
    D R(-angle) D^-1 diag(1/sx, 1/sy)."""
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    return np.array([[cos / sx, sin * q / sy], [-sin / (q * sx), cos / sy]])


def _gather(stack: np.ndarray, src_x: np.ndarray, src_y: np.ndarray,
            ) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear samples of each (n, n) image in `stack` at centred source coordinates (any
    shape) -> (values (C, *shape), inside (*shape)); samples outside the image read zero."""
    n = stack.shape[-1]
    c = (n - 1) / 2 + 1  # + 1: into the zero-padded image
    x = src_x + np.float32(c)
    y = src_y + np.float32(c)
    inside = (x >= 1) & (x <= n) & (y >= 1) & (y <= n)
    # clipping into the zero border makes every sample outside the image read zero
    np.clip(x, 0, n + 1, out=x)
    np.clip(y, 0, n + 1, out=y)
    x0 = np.floor(x)
    y0 = np.floor(y)
    wx = x - x0  # float32 throughout: half the memory traffic of float64
    wy = y - y0
    w = n + 3  # padded width: one zero row/column before, two after, so +1 and +w stay inside
    flat = np.pad(stack.astype(np.float32, copy=False), ((0, 0), (1, 2), (1, 2)))
    flat = flat.reshape(len(stack), -1)
    i = (y0 * np.float32(w) + x0).astype(np.intp)  # exact: (n + 3)^2 < 2^24
    top_left = flat[:, i]
    top = top_left + wx * (flat[:, i + 1] - top_left)
    i += w
    bottom_left = flat[:, i]
    bottom = bottom_left + wx * (flat[:, i + 1] - bottom_left)
    return top + wy * (bottom - top), inside


@functools.lru_cache(maxsize=8)
def _centred_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:n, :n].astype(np.float32) - np.float32((n - 1) / 2)
    return yy, xx


def _best_ncc(images: np.ndarray, template: np.ndarray, where: bool = False):
    """Max normalised cross-correlation of `template` over all placements inside each image
    (and, with where, the (y, x) of each best placement's top-left corner).

    Correlations by FFT (scipy's: several times faster than numpy's on these small batches),
    the windows' means and energies by running sums.
    """
    n = images.shape[-1]
    m = template.shape[0]
    t = template - template.mean()
    tn = float(np.sqrt((t * t).sum()))
    if tn < 1e-9:
        zero = np.zeros(len(images))
        return (zero, np.zeros((len(images), 2), int)) if where else zero
    kernel = np.zeros((n, n), np.float32)
    kernel[:m, :m] = t[::-1, ::-1]
    spec = sp_fft.rfft2(images.astype(np.float32)) * sp_fft.rfft2(kernel)
    cc = sp_fft.irfft2(spec, s=(n, n))[:, m - 1:n, m - 1:n]
    s1 = _window_sums(images, m)
    s2 = _window_sums(images * images, m)
    sd = np.sqrt(np.maximum(s2 - s1 * s1 / (m * m), 0.0))
    ncc = np.where(sd > 1e-6 * tn, cc / np.maximum(sd, 1e-12) / tn, 0.0)
    flat = ncc.reshape(len(images), -1)
    best = flat.argmax(axis=1)
    score = flat[np.arange(len(images)), best]
    if not where:
        return score
    return score, np.stack(np.unravel_index(best, ncc.shape[1:]), axis=1)


def _window_sums(x: np.ndarray, m: int) -> np.ndarray:
    """Sums over every m x m window of each image in x (N, n, n) -> (N, n-m+1, n-m+1)."""
    k = x.shape[-1] - m + 1
    lo = m // 2  # where uniform_filter1d puts the first full window
    a = ndimage.uniform_filter1d(x, m, axis=2, mode="constant")[:, :, lo:lo + k]
    a = ndimage.uniform_filter1d(a, m, axis=1, mode="constant")[:, lo:lo + k]
    return a.astype(np.float64) * (m * m)


CENTRE = 0.7  # share of a's side that b must reproduce (a copy may lose the margins)


def _centre(x: np.ndarray, frac: float = CENTRE) -> np.ndarray:
    n = x.shape[0]
    m = int(round(n * frac))
    o = (n - m) // 2
    return x[o:o + m, o:o + m]


@dataclass(frozen=True)
class Match:
    """How b maps onto a: dihedral(b, orient), then the warp (angle, scale_x, scale_y, aspect:
    see `_warps`), then a shift of (shift_y, shift_x) px at 128 px."""

    score: float  # band-pass correlation at 128 px after alignment, in [-1, 1]
    orient: int  # dihedral(b, orient) is a turned the right way
    angle: float
    scale_x: float
    scale_y: float
    aspect: float  # height / width of the frame the rotation was made in
    shift_y: float = 0.0
    shift_x: float = 0.0
    residual: float = math.inf  # the confirmation's residual (inf: not confirmed, see step 3)

    @property
    def same(self) -> bool:
        """One image is a copy of the other: aligned well and confirmed pixel by pixel."""
        return self.score >= MATCH_SCORE and self.residual <= MAX_RESIDUAL


def match(a: np.ndarray, b: np.ndarray, sims: np.ndarray | None = None,
          aspect_a: float = 1.0, aspect_b: float = 1.0) -> Match:
    """How well thumbnail b, turned, rotated, scaled and shifted, reproduces the centre of a.

    aspect_a, aspect_b: height / width of the original images. Cheapest first, because most
    candidate pairs are look-alikes to reject and most copies are plain:
    1. b in its best orientation as it is, at 128 px (re-encoded, resized, turned copies);
    2. a grid at 32 px: the two or three orientations whose descriptors come closest (a leg and
       its mirror image are alike when blurred, and a crop can favour the wrong one by 0.15),
       rotation in either image's frame, scale, every shift. Most look-alikes stop here;
    3. the best of the grid refined at 64 px with separate x and y scales (a crop of one side
       changes the aspect ratio), then at 128 px.
    Every alignment above MATCH_SCORE is confirmed (`_confirm`); the first confirmed one is the
    answer, else the best aligned. An orientation whose grid score is close to the best one's
    is tried too when the best fails: a symmetric bone matches itself turned by 180 degrees.
    """
    if sims is None:  # descriptor similarity of each orientation of b to a
        sims = descriptors(b) @ descriptors(a)[0]
    order = np.argsort(-sims)[:MAX_ORIENTS]
    ranked = [int(o) for k, o in enumerate(order) if k < 2 or sims[o] >= sims.max() - 0.2]
    n = a.shape[0]
    a_bp = band_pass(a, 1.0, 4.0)
    a128 = _centre(a_bp)
    b128 = band_pass(b, 1.0, 4.0)  # band-pass commutes with the flips: filter once
    o128 = (n - a128.shape[0]) // 2  # where a's centre sits

    def placed(score: float, o: int, warp: tuple, at) -> Match:
        # the template's best top-left corner `at` in the warped b -> b's shift onto a
        return Match(float(score), o, *warp, float(o128 - at[0]), float(o128 - at[1]))

    (as_is,), (at,) = _best_ncc(dihedral(b128, ranked[0])[None], a128, where=True)
    tried = [placed(as_is, ranked[0], (0.0, 1.0, 1.0, aspect_a), at)]
    if as_is >= MATCH_SCORE:
        tried[0] = _confirm(a, b, a_bp, b128, tried[0])
        if tried[0].same:
            return tried[0]
    template32 = _centre(band_pass(_block_mean(a, n // 4), 0.5, 1.5))
    b32 = band_pass(_block_mean(b, n // 4), 0.5, 1.5)
    template64 = _centre(band_pass(_block_mean(a, n // 2), 0.7, 2.5))
    b64 = band_pass(_block_mean(b, n // 2), 0.7, 2.5)

    def grid(o: int) -> tuple[float, int, tuple[float, float, float, float]]:
        # b's frame, seen in a's orientation: a transpose swaps its sides
        frames = {aspect_a, 1 / aspect_b if o & 4 else aspect_b}
        if max(frames) / min(frames) < 1.03:
            frames = {aspect_a}
        warps = [(angle, s, s, q) for q in sorted(frames) for s in SCALES for angle in ANGLES]
        coarse = _best_ncc(_warps(dihedral(b32, o), warps), template32)
        k = int(coarse.argmax())
        return float(coarse[k]), o, warps[k]

    def attempt(score: float, o: int, warp: tuple[float, float, float, float]) -> Match:
        angle, s, _, q = warp
        if score < PRESCREEN:
            return Match(score, o, angle, s, s, q)
        # steps of 5 degrees and 10 % leave at most 2.5 degrees and 5 % to find
        local = [(angle + da, s * fx, s * fy, q) for da in (-2.0, 0.0, 2.0)
                 for fx in (0.93, 1.0, 1.07) for fy in (0.93, 1.0, 1.07)]
        refined = _best_ncc(_warps(dihedral(b64, o), local), template64)
        k = int(refined.argmax())
        score, (angle, sx, sy, q) = float(refined[k]), local[k]
        if score < HOPELESS:
            return Match(score, o, angle, sx, sy, q)
        fine_grid = [(angle, sx * fx, sy * fy, q) for fx in (0.97, 1.0, 1.03)
                     for fy in (0.97, 1.0, 1.03)]
        fine, at = _best_ncc(_warps(dihedral(b128, o), fine_grid), a128, where=True)
        k = int(fine.argmax())
        m = placed(fine[k], o, fine_grid[k], at[k])
        return _confirm(a, b, a_bp, b128, m) if m.score >= MATCH_SCORE else m

    coarse: list[tuple] = []
    for o in ranked:
        coarse.append(grid(o))
        if coarse[-1][0] >= CLEAR:
            break
    # the best orientation first; when it aligns and comes close to confirming, but fails,
    # every other one: a bar at 45 degrees looks the same transposed, a symmetric bone turned
    # by 180 degrees, and the grid, which scales x and y alike, underrates a copy cropped on
    # one side. A look-alike of another picture is not close (residual > 2 MAX_RESIDUAL).
    ordered = sorted(coarse, key=lambda c: -c[0])
    tried.append(attempt(*ordered[0]))
    if tried[-1].same:
        return tried[-1]
    if min(m.residual for m in tried) <= PROMISING * MAX_RESIDUAL:
        done = {c[1] for c in coarse}
        waiting = ordered[1:] + [grid(int(o)) for o in np.argsort(-sims, kind="stable")
                                 if o not in done]
        for c in sorted(waiting, key=lambda c: -c[0]):
            if c[0] < max(PRESCREEN, ordered[0][0] - 0.2):
                break
            tried.append(attempt(*c))
            if tried[-1].same:
                return tried[-1]
    return max(tried, key=lambda m: m.score)


# ---------------------------------------------------------------------------- confirmation

def _confirm(a: np.ndarray, b: np.ndarray, a_bp: np.ndarray, b_bp: np.ndarray,
             m: Match) -> Match:
    """Refine m's alignment (`_refine`) and measure the residual (`_residual`)."""
    score, warp, shift = _refine(a_bp, dihedral(b_bp, m.orient), m)
    residual = _residual(a, dihedral(b, m.orient), warp, shift)
    return Match(max(score, m.score), m.orient, *warp, *shift, residual=residual)


@functools.lru_cache(maxsize=4)
def _region(n: int, frac: float = CENTRE) -> tuple[np.ndarray, np.ndarray, int]:
    """Centred (x, y) coordinates of a's centre square, flattened -> (2, k*k), and k."""
    k = int(round(n * frac))
    o = (n - k) // 2
    yy, xx = np.mgrid[o:o + k, o:o + k].astype(np.float64) - (n - 1) / 2
    return np.stack([xx.ravel(), yy.ravel()]), np.array([o, k]), k


def _refine(a_bp: np.ndarray, b_bp: np.ndarray, m: Match,
            ) -> tuple[float, tuple[float, float, float, float], tuple[float, float]]:
    """Gauss-Newton on (angle, log sx, log sy, shift y, shift x) from m's alignment: the
    band-pass correlation of a's centre with the warped b, to a fraction of a pixel (the
    grid's steps of 2 degrees and 3 % leave a copy's residual as large as a look-alike's).

    The model is a = gain * warp(b) + bias; gain and bias are solved for at each step.
    -> (correlation, (angle, sx, sy, aspect), (shift y, shift x)).
    """
    n = a_bp.shape[0]
    u, (o, k), _ = _region(n)
    t = a_bp[o:o + k, o:o + k].ravel().astype(np.float64)
    gy, gx = np.gradient(b_bp.astype(np.float64))
    stack = np.stack([b_bp, gx, gy])
    q = m.aspect
    p = np.array([m.angle, math.log(m.scale_x), math.log(m.scale_y), m.shift_y, m.shift_x])
    limit = np.array([2.0, 0.04, 0.04, 2.0, 2.0])  # a step at most: stay near the grid's answer
    best = (-2.0, p.copy())
    for _ in range(REFINE_ITERS):
        inv = _inverse(p[0], math.exp(p[1]), math.exp(p[2]), q)
        v = u - np.array([[p[4]], [p[3]]])  # output coordinates before the shift
        s = inv @ v
        (w, bx, by), inside = _gather(stack, s[0].astype(np.float32), s[1].astype(np.float32))
        if inside.sum() < 0.5 * len(t):
            break
        tv, wv = t[inside], w[inside].astype(np.float64)
        tc, wc = tv - tv.mean(), wv - wv.mean()
        ncc = float(tc @ wc / math.sqrt(max((tc @ tc) * (wc @ wc), 1e-24)))
        if ncc > best[0]:
            best = (ncc, p.copy())
        # d(source)/d(parameter), then d(warped b)/d(parameter) = gradient . d(source)
        rad = math.radians(1.0)
        a_ = math.radians(p[0])
        sx, sy = math.exp(p[1]), math.exp(p[2])
        d_angle = rad * np.array([[-math.sin(a_) / sx, math.cos(a_) * q / sy],
                                  [-math.cos(a_) / (q * sx), -math.sin(a_) / sy]])
        ds = (d_angle @ v, np.array([[-inv[0, 0]], [-inv[1, 0]]]) * v[:1],
              np.array([[-inv[0, 1]], [-inv[1, 1]]]) * v[1:], -inv[:, 1:2], -inv[:, 0:1])
        jac = np.stack([bx * d[0] + by * d[1] for d in
                        (np.broadcast_to(d, s.shape) for d in ds)])[:, inside]
        gain, bias = np.linalg.lstsq(np.stack([wv, np.ones_like(wv)], 1), tv, rcond=None)[0]
        jac *= gain
        step = np.linalg.solve(jac @ jac.T + 1e-9 * np.eye(5), jac @ (tv - gain * wv - bias))
        step = np.clip(step, -limit, limit)
        p = p + step
        if np.all(np.abs(step) < [0.01, 2e-4, 2e-4, 0.01, 0.01]):
            break
    score, p = best
    return score, (p[0], math.exp(p[1]), math.exp(p[2]), q), (p[3], p[4])


def _residual(a: np.ndarray, b: np.ndarray, warp: tuple[float, float, float, float],
              shift: tuple[float, float], sigma: float = RESIDUAL_SIGMA, bins: int = 32,
              ) -> float:
    """Is a's centre a function of the aligned b? The rms of a - E[a | b] over the pixels
    both show, blurred, as a fraction of the blurred a's spread there: ~0 for a copy whatever
    its brightness, contrast, gamma or clipping; what the images do not share (background,
    soft tissue, texture) for another image. Both images are blurred alike first (a resized
    or rotated copy is softer than its original), the residual after the mapping (which is
    not linear) again: resampling and JPEG noise do not count. inf when too little of b
    overlaps a's centre to tell."""
    n = a.shape[0]
    u, (o, k), _ = _region(n)
    a = ndimage.gaussian_filter(np.asarray(a, np.float32), MATCH_BLUR, mode="reflect")
    b = ndimage.gaussian_filter(np.asarray(b, np.float32), MATCH_BLUR, mode="reflect")
    s = _inverse(*warp) @ (u - np.array([[shift[1]], [shift[0]]]))
    (w,), inside = _gather(b[None], s[0].astype(np.float32), s[1].astype(np.float32))
    w, inside = w.reshape(k, k).astype(np.float64), inside.reshape(k, k)
    # b's border pixels read zero in part, and its blur saw the reflected image there
    inside = ndimage.binary_erosion(inside, iterations=int(math.ceil(MATCH_BLUR)))
    centre = a[o:o + k, o:o + k].astype(np.float64)
    if inside.sum() < 0.4 * k * k:
        return math.inf
    av, bv = centre[inside], w[inside]
    # E[a | b]: the mean of a per grey level of b, interpolated between the levels (a step
    # function would leave a residual of a level's width, ~0.03, even for a perfect copy)
    lo, hi = np.percentile(bv, [0.5, 99.5])
    level = np.clip(((bv - lo) * (bins / max(hi - lo, 1e-9))).astype(int), 0, bins - 1)
    count = np.bincount(level, minlength=bins)
    used = count > 0
    mean_b = np.bincount(level, bv, bins)[used] / count[used]
    mean_a = np.bincount(level, av, bins)[used] / count[used]
    diff = np.zeros((k, k))
    diff[inside] = av - np.interp(bv, mean_b, mean_a)
    # blurred within the overlap only (normalised convolution), judged away from its edge
    weight = ndimage.gaussian_filter(inside.astype(np.float64), sigma)
    blur_diff = ndimage.gaussian_filter(diff, sigma) / np.maximum(weight, 1e-9)
    blur_a = ndimage.gaussian_filter(centre * inside, sigma) / np.maximum(weight, 1e-9)
    valid = ndimage.binary_erosion(inside, iterations=int(math.ceil(sigma)))
    spread = blur_a[valid].std() if valid.any() else 0.0
    if spread < 1e-6:
        return math.inf  # a flat centre: nothing to confirm with
    return float(np.sqrt(np.mean(blur_diff[valid] ** 2)) / spread)


# ---------------------------------------------------------------------------- pairs

VERDICT = np.dtype([("score", np.float32), ("residual", np.float32)])


def _match_pairs(args: tuple[np.ndarray, ...]) -> np.ndarray:
    a, b, sims, qa, qb = args
    out = np.zeros(len(a), VERDICT)
    for k, row in enumerate(zip(a, b, sims, qa, qb)):
        m = match(*row)
        out[k] = (m.score, m.residual)
    return out


def verify_pairs(thumbs: np.ndarray, aspects: np.ndarray, desc: np.ndarray, batch: np.ndarray,
                 executor=None) -> np.ndarray:
    """`match` verdicts (VERDICT: score, residual) of the pairs (i, j) in batch, in parallel
    when an executor is given."""
    i, j = batch["i"], batch["j"]
    args = (thumbs[i], thumbs[j], np.einsum("pod,pd->po", desc[j], desc[i, 0]), aspects[i],
            aspects[j])
    if executor is None or len(batch) < 16:
        return _match_pairs(args)
    workers = getattr(executor, "_max_workers", 2)
    bounds = np.linspace(0, len(batch), workers * 2 + 1).astype(int)
    jobs = [tuple(x[s:e] for x in args) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return np.concatenate(list(executor.map(_match_pairs, jobs)))
