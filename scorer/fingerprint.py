"""Fingerprints of images: exact (sha256 of the bytes) and near-duplicate (what the pixels show).

Public fracture data sets hold the same radiograph many times: re-encoded, resized (often
stretched to 224 x 224), flipped, turned by 90 degrees, rotated by a few degrees, slightly
cropped, brighter or darker. X-rays of the same body part look alike when small, so finding the
copies takes two steps:

1. Candidates. Every image becomes a 128 x 128 grey thumbnail (squashed: see `thumbnail`). The
   6 x 6 lowest DCT frequencies of it and of its central 75 %, at 32 x 32, zero mean, unit
   length, are a descriptor whose dot product is the correlation of two heavily blurred images:
   blind to brightness/contrast, resizing and re-encoding, tolerant of small rotations, crops
   and shifts. Flips and 90 degree turns only permute signs and axes of DCT coefficients, so the
   8 orientations cost one DCT. Blocked matrix products give each image its 6 closest others.
2. Verification. A candidate pair is aligned (orientation, rotation up to +-15 degrees in either
   image's frame, x and y scale, shift) and compared by normalised cross-correlation of
   band-passed thumbnails, coarse to fine (32, 64, 128 px), rejecting look-alikes early.
   Band-passing keeps edges and trabecular texture, which differ between two films of the same
   wrist even when their silhouettes agree.

Verified pairs join groups (union-find), most similar first; pairs already joined are skipped.
The thresholds were calibrated on the real data set. Planted copies of every kind score above
0.85, look-alike films of other patients below 0.65. Between 0.80 and 0.85 lie both copies
with heavy edits (a knee turned 12 degrees and zoomed: 0.82) and a few other films of the same
patient (his left and right wrist: 0.82). Both are joined: a missed copy is a silent leak,
and the same patient in train and test is a leak as well.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from PIL import Image
from scipy import fft as sp_fft, ndimage  # scipy comes with scikit-learn

THUMB = 128  # thumbnail side; verification's fine level works at this size
DCT_SIDE = 32  # the candidate descriptor's image side
DCT_K = 6  # keep the K x K lowest frequencies (minus DC)
CANDIDATE_SIM = 0.50  # descriptor similarity for a pair to be verified at all
MATCH_SCORE = 0.80  # verified band-pass correlation at 128 px that joins two images (see above)
MAX_NEIGHBOURS = 6  # candidates per image, best first: copies rank first, bounded work
MAX_TRIES = 3  # verifications between two groups before they are taken to be distinct
MAX_ORIENTS = 3  # orientations tried per pair (near-symmetric images rank several alike)
ANGLES = (-15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0)
SCALES = (0.9, 1.0, 1.1)
PRESCREEN = 0.55  # 32 px correlation that copies exceed (calibrated: >= 0.69 for every
#                   planted kind, >= 0.9 for the real set's copies; 80 % of look-alikes fail)
HOPELESS = 0.5  # 64 px correlation below which the 128 px one never reached MATCH_SCORE
CLEAR = 0.9  # 32 px correlation above which no other orientation is tried

Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------- exact

def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (streamed, so DICOM volumes do not fill memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
    small = np.asarray(Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), "F")
                       .resize((size, size), Image.BOX), dtype=np.float32)
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
    return np.asarray(Image.fromarray(x, "F").resize((side, side), Image.BOX))


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


def candidate_pairs(desc: np.ndarray, min_sim: float = CANDIDATE_SIM,
                    max_neighbours: int = MAX_NEIGHBOURS, part: np.ndarray | None = None,
                    ) -> np.ndarray:
    """(N, 8, D) descriptors -> pairs (i < j, sim) to verify, most similar first.

    Each image keeps its `max_neighbours` most similar partners (in any orientation) above
    `min_sim`. Low frequencies alone cannot tell two wrists apart, so a plain threshold would
    pass a large share of all pairs; copies rank first, and a group of copies stays connected
    because every member keeps its closest ones. Blocked matrix products bound the memory.

    part: only partners from another part (split): the pairs that could make a leak. Each
    image's best partners elsewhere include every such pair among its best partners overall.
    """
    n = len(desc)
    if n < 2:
        return np.zeros(0, PAIR)
    q = desc[:, 0]
    everything = desc.reshape(n * 8, -1)
    k = min(max_neighbours, n - 1)
    block = max(1, (1 << 24) // (n * 8))
    parts = []
    for start in range(0, n, block):
        sims = (q[start:start + block] @ everything.T).reshape(-1, n, 8).max(axis=2)
        rows = np.arange(start, start + len(sims))
        sims[np.arange(len(sims)), rows] = -np.inf  # an image is not its own copy
        if part is not None:
            sims[part[rows][:, None] == part[None, :]] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sim = np.take_along_axis(sims, top, axis=1)
        keep = top_sim >= min_sim
        parts.append((np.broadcast_to(rows[:, None], top.shape)[keep], top[keep], top_sim[keep]))
    ii, jj, ss = (np.concatenate(p) for p in zip(*parts))
    pairs = np.zeros(len(ii), PAIR)
    pairs["i"], pairs["j"], pairs["sim"] = np.minimum(ii, jj), np.maximum(ii, jj), ss
    # (i, j) found from both ends: keep one. The two similarities are equal up to rounding.
    _, first = np.unique(pairs["i"] * n + pairs["j"], return_index=True)
    pairs = pairs[first]
    return pairs[np.argsort(-pairs["sim"], kind="stable")]


# ---------------------------------------------------------------------------- verification

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
    angle, sx, sy, q = (np.radians(p[:, 0]), p[:, 1], p[:, 2], p[:, 3])
    cos, sin = np.cos(angle), np.sin(angle)
    # the inverse map, output -> input: D R(-angle) D^-1 diag(1/sx, 1/sy)
    m = np.stack([cos / sx, sin * q / sy, -sin / (q * sx), cos / sy], axis=1)
    m = m.astype(np.float32)[:, :, None, None]
    n = x.shape[0]
    c = (n - 1) / 2
    yy, xx = _centred_grid(n)
    src_x = m[:, 0] * xx + m[:, 1] * yy + (c + 1)  # + 1: into the zero-padded image
    src_y = m[:, 2] * xx + m[:, 3] * yy + (c + 1)
    # clipping into the zero border makes every sample outside the image read zero
    np.clip(src_x, 0, n + 1, out=src_x)
    np.clip(src_y, 0, n + 1, out=src_y)
    x0 = src_x.astype(np.intp)  # floor: non-negative after clipping
    y0 = src_y.astype(np.intp)
    wx = src_x - x0
    wy = src_y - y0
    w = n + 3  # padded width: one zero column before, two after, so +1 and +w stay inside
    flat = np.pad(x.astype(np.float32), ((1, 2), (1, 2))).ravel()
    i = y0 * w + x0
    top = flat[i] + wx * (flat[i + 1] - flat[i])
    bottom = flat[i + w] + wx * (flat[i + w + 1] - flat[i + w])
    return top + wy * (bottom - top)


@functools.lru_cache(maxsize=8)
def _centred_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:n, :n].astype(np.float32) - np.float32((n - 1) / 2)
    return yy, xx


def _best_ncc(images: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Max normalised cross-correlation of `template` over all placements inside each image.

    Correlations by FFT (scipy's: several times faster than numpy's on these small batches),
    the windows' means and energies by running sums.
    """
    n = images.shape[-1]
    m = template.shape[0]
    t = template - template.mean()
    tn = float(np.sqrt((t * t).sum()))
    if tn < 1e-9:
        return np.zeros(len(images))
    kernel = np.zeros((n, n), np.float32)
    kernel[:m, :m] = t[::-1, ::-1]
    spec = sp_fft.rfft2(images.astype(np.float32)) * sp_fft.rfft2(kernel)
    cc = sp_fft.irfft2(spec, s=(n, n))[:, m - 1:n, m - 1:n]
    s1 = _window_sums(images, m)
    s2 = _window_sums(images * images, m)
    sd = np.sqrt(np.maximum(s2 - s1 * s1 / (m * m), 0.0))
    ncc = np.where(sd > 1e-6 * tn, cc / np.maximum(sd, 1e-12) / tn, 0.0)
    return ncc.reshape(len(images), -1).max(axis=1)


def _window_sums(x: np.ndarray, m: int) -> np.ndarray:
    """Sums over every m x m window of each image in x (N, n, n) -> (N, n-m+1, n-m+1)."""
    k = x.shape[-1] - m + 1
    lo = m // 2  # where uniform_filter1d puts the first full window
    a = ndimage.uniform_filter1d(x, m, axis=2, mode="constant")[:, :, lo:lo + k]
    a = ndimage.uniform_filter1d(a, m, axis=1, mode="constant")[:, lo:lo + k]
    return a.astype(np.float64) * (m * m)


def _centre(x: np.ndarray, frac: float = 0.7) -> np.ndarray:
    n = x.shape[0]
    m = int(round(n * frac))
    o = (n - m) // 2
    return x[o:o + m, o:o + m]


@dataclass(frozen=True)
class Match:
    score: float  # band-pass correlation at 128 px after alignment, in [-1, 1]
    orient: int  # dihedral(b, orient) is a turned the right way
    angle: float
    scale_x: float
    scale_y: float
    aspect: float  # height / width of the frame the rotation was made in


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
    """
    if sims is None:  # descriptor similarity of each orientation of b to a
        sims = descriptors(b) @ descriptors(a)[0]
    order = np.argsort(-sims)[:MAX_ORIENTS]
    ranked = [int(o) for k, o in enumerate(order) if k < 2 or sims[o] >= sims.max() - 0.2]
    a128 = _centre(band_pass(a, 1.0, 4.0))
    b128 = band_pass(b, 1.0, 4.0)  # band-pass commutes with the flips: filter once
    as_is = float(_best_ncc(dihedral(b128, ranked[0])[None], a128)[0])
    if as_is >= MATCH_SCORE:
        return Match(as_is, ranked[0], 0.0, 1.0, 1.0, aspect_a)
    n = a.shape[0]
    template32 = _centre(band_pass(_block_mean(a, n // 4), 0.5, 1.5))
    b32 = band_pass(_block_mean(b, n // 4), 0.5, 1.5)
    best = (-2.0, 0, (0.0, 1.0, 1.0, aspect_a))
    for o in ranked:
        # b's frame, seen in a's orientation: a transpose swaps its sides
        frames = {aspect_a, 1 / aspect_b if o & 4 else aspect_b}
        if max(frames) / min(frames) < 1.03:
            frames = {aspect_a}
        grid = [(angle, s, s, q) for q in sorted(frames) for s in SCALES for angle in ANGLES]
        coarse = _best_ncc(_warps(dihedral(b32, o), grid), template32)
        k = int(coarse.argmax())
        if coarse[k] > best[0]:
            best = (float(coarse[k]), o, grid[k])
        if best[0] >= CLEAR:
            break
    score, o, (angle, s, _, q) = best
    if score < PRESCREEN:
        return Match(score, o, angle, s, s, q)
    # steps of 5 degrees and 10 % leave at most 2.5 degrees and 5 % to find
    local = [(angle + da, s * fx, s * fy, q) for da in (-2.0, 0.0, 2.0)
             for fx in (0.93, 1.0, 1.07) for fy in (0.93, 1.0, 1.07)]
    refined = _best_ncc(_warps(dihedral(band_pass(_block_mean(b, n // 2), 0.7, 2.5), o), local),
                        _centre(band_pass(_block_mean(a, n // 2), 0.7, 2.5)))
    k = int(refined.argmax())
    score, (angle, sx, sy, q) = float(refined[k]), local[k]
    if score < HOPELESS:
        return Match(score, o, angle, sx, sy, q)
    fine_grid = [(angle, sx * fx, sy * fy, q) for fx in (0.97, 1.0, 1.03)
                 for fy in (0.97, 1.0, 1.03)]
    fine = _best_ncc(_warps(dihedral(b128, o), fine_grid), a128)
    k = int(fine.argmax())
    return Match(max(float(fine[k]), as_is if o == ranked[0] else -1.0), o, *fine_grid[k])


def _match_pairs(args: tuple[np.ndarray, ...]) -> np.ndarray:
    a, b, sims, qa, qb = args
    return np.array([match(*row).score for row in zip(a, b, sims, qa, qb)], np.float32)


# ---------------------------------------------------------------------------- grouping

class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def labels(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))])


@dataclass
class NearGroups:
    """Result of `near_duplicate_groups` over N thumbnails."""

    labels: np.ndarray  # (N,) group id = smallest member index
    links: list[tuple[int, int, float, float]]  # verified (i, j, descriptor sim, match score)
    checked: int  # candidate pairs that were verified


def near_duplicate_groups(thumbs: np.ndarray, aspects: np.ndarray | None = None, *,
                          executor=None, progress: Progress | None = None,
                          min_score: float = MATCH_SCORE, chunk: int = 256) -> NearGroups:
    """Group (N, THUMB, THUMB) thumbnails into near-duplicate groups (connected components).

    Candidates are verified most similar first, and a pair already joined through others is
    skipped: that keeps verification near-linear in a heavily duplicated set. Each round
    verifies up to `chunk` pairs, in parallel when an `executor` is given.
    """
    n = len(thumbs)
    aspects = np.ones(n) if aspects is None else np.asarray(aspects, np.float64)
    desc = np.stack([descriptors(t) for t in thumbs]) if n else np.zeros((0, 8, 1), np.float32)
    pairs = candidate_pairs(desc)
    uf = UnionFind(n)
    links: list[tuple[int, int, float, float]] = []
    tries: dict[tuple[int, int], int] = {}
    checked = pos = 0
    while pos < len(pairs):
        batch = []
        while pos < len(pairs) and len(batch) < chunk:
            ri, rj = uf.find(int(pairs["i"][pos])), uf.find(int(pairs["j"][pos]))
            key = (min(ri, rj), max(ri, rj))
            # two groups that failed MAX_TRIES times on their most similar members will not
            # match on less similar ones: a large group of augmented copies would otherwise
            # be compared with its look-alike neighbours member by member
            if ri != rj and tries.get(key, 0) < MAX_TRIES:
                tries[key] = tries.get(key, 0) + 1
                batch.append(pos)
            pos += 1
        if not batch:
            continue
        chosen = pairs[batch]
        scores = verify_pairs(thumbs, aspects, desc, chosen, executor)
        checked += len(chosen)
        for (i, j, sim), score in zip(chosen.tolist(), scores.tolist()):
            if score >= min_score:
                uf.union(i, j)
                links.append((i, j, sim, score))
        if progress:
            progress("verify", pos, len(pairs))
    return NearGroups(uf.labels(), links, checked)


def verify_pairs(thumbs: np.ndarray, aspects: np.ndarray, desc: np.ndarray, batch: np.ndarray,
                 executor=None) -> np.ndarray:
    """`match` scores of the pairs (i, j) in batch, in parallel when an executor is given."""
    i, j = batch["i"], batch["j"]
    args = (thumbs[i], thumbs[j], np.einsum("pod,pd->po", desc[j], desc[i, 0]), aspects[i],
            aspects[j])
    if executor is None or len(batch) < 16:
        return _match_pairs(args)
    workers = getattr(executor, "_max_workers", 2)
    bounds = np.linspace(0, len(batch), workers * 2 + 1).astype(int)
    jobs = [tuple(x[s:e] for x in args) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return np.concatenate(list(executor.map(_match_pairs, jobs)))
