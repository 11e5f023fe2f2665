"""Fingerprints of images: exact (sha256 of the bytes) and near-duplicate (what the pixels show).

Public fracture data sets hold the same radiograph many times: re-encoded, resized, flipped,
rotated by 90 degrees or a few degrees, slightly cropped, brighter or darker. Finding those
copies takes two steps, because X-rays of the same body part look alike when small:

1. Candidates. Every image becomes a 128 x 128 grey thumbnail; its 8 x 8 lowest DCT frequencies
   (of a 32 x 32 version, zero mean, unit length) are a descriptor whose dot product is the
   correlation of two heavily blurred images: blind to brightness/contrast, resizing and
   re-encoding, and tolerant of small rotations, crops and shifts. Flips, transposes and 90
   degree turns only permute signs and axes of DCT coefficients, so all 8 orientations of an
   image cost one DCT. Pairs above a loose similarity come from blocked matrix products.
2. Verification. A candidate pair is aligned (its best orientation, then a search over rotation
   up to +-15 degrees, scale +-13 % and shift) and compared by normalised cross-correlation of
   band-passed thumbnails, first at 64 px, then refined at 128 px. Band-passing keeps edges and
   trabecular texture, which differ between two patients' wrists even when their silhouettes
   agree; a blurred silhouette does not.

Both thresholds were calibrated on the real data set (see tests/test_fingerprint.py).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from PIL import Image
from scipy import fft as sp_fft  # scipy comes with scikit-learn

THUMB = 128  # thumbnail side; verification's fine level works at this size
DCT_SIDE = 32  # the candidate descriptor's image side
DCT_K = 8  # keep the K x K lowest frequencies (minus DC)
CANDIDATE_SIM = 0.70  # descriptor similarity for a pair to be verified at all
MATCH_SCORE = 0.60  # verified band-pass correlation at 128 px that makes two images one group
MAX_NEIGHBOURS = 24  # candidates per image: enough to connect any group, bounded work
ANGLES = np.arange(-15.0, 15.01, 2.5)
SCALES = (0.885, 0.94, 1.0, 1.064, 1.13)

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
    """(H, W) float image -> (size, size) uint8: area-averaged, longer side = size, centred on
    black, stretched to the image's own min..max.

    Keeping the aspect ratio keeps geometry honest: rotating a tall image and squashing it to a
    square would be a shear, which no rotation search could undo. Black is what rotated copies
    are filled with, and the background of most radiographs. Stretching keeps 16-bit images with
    a narrow range from collapsing into a few grey levels.
    """
    h, w = img.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), "F")
                       .resize((nw, nh), Image.BOX), dtype=np.float32)
    out = np.zeros((size, size), np.uint8)
    lo, hi = float(small.min()), float(small.max())
    if hi - lo > 1e-12:
        y, x = (size - nh) // 2, (size - nw) // 2
        out[y:y + nh, x:x + nw] = np.round((small - lo) * (255.0 / (hi - lo)))
    return out


def _dct_matrix(n: int, k: int) -> np.ndarray:
    x = np.arange(n)
    u = np.arange(k)[:, None]
    m = np.cos(np.pi * (2 * x + 1) * u / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m.astype(np.float32)


_DCT = _dct_matrix(DCT_SIDE, DCT_K)
_SIGN = (-1.0) ** np.arange(DCT_K, dtype=np.float32)


def descriptors(thumb: np.ndarray) -> np.ndarray:
    """(THUMB, THUMB) thumbnail -> (8, K*K) float32: unit descriptors of its 8 orientations.

    Row o describes `dihedral(thumb, o)`. DCT-II of a flipped axis multiplies frequency u by
    (-1)^u, and transposing the image transposes the coefficients.
    """
    t = thumb.astype(np.float32)
    f = t.shape[0] // DCT_SIDE
    s = t.reshape(DCT_SIDE, f, DCT_SIDE, f).mean(axis=(1, 3))
    c = _DCT @ (s - s.mean()) @ _DCT.T
    out = np.empty((8, DCT_K * DCT_K), np.float32)
    for o in range(8):
        v = c.T if o & 4 else c
        if o & 2:
            v = v * _SIGN[:, None]
        if o & 1:
            v = v * _SIGN[None, :]
        out[o] = v.ravel()
    out[:, 0] = 0.0
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norm, 1e-12)


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

def candidate_pairs(desc: np.ndarray, min_sim: float = CANDIDATE_SIM,
                    max_neighbours: int = MAX_NEIGHBOURS) -> np.ndarray:
    """(N, 8, D) descriptors -> structured array of pairs (i < j, sim, orient), best first.

    `orient` is the orientation of j that best matches i as it is. Blocked matrix products,
    each image's `max_neighbours` best partners above `min_sim` (a group of copies is still
    connected: every copy keeps its closest ones).
    """
    n = len(desc)
    dtype = [("i", np.int64), ("j", np.int64), ("sim", np.float32), ("orient", np.int8)]
    if n < 2:
        return np.zeros(0, dtype)
    q = desc[:, 0]
    everything = desc.reshape(n * 8, -1)
    block = max(1, (1 << 24) // (n * 8))
    parts = []
    for start in range(0, n, block):
        sims = (q[start:start + block] @ everything.T).reshape(-1, n, 8)
        orient = sims.argmax(axis=2)
        best = np.take_along_axis(sims, orient[..., None], axis=2)[..., 0]
        rows = np.arange(start, start + len(best))
        best[np.arange(len(best)), rows] = -np.inf  # an image is not its own copy
        k = min(max_neighbours, n - 1)
        top = np.argpartition(-best, k - 1, axis=1)[:, :k]
        top_sim = np.take_along_axis(best, top, axis=1)
        keep = top_sim >= min_sim
        ii = np.broadcast_to(rows[:, None], top.shape)[keep]
        jj = top[keep]
        parts.append((ii, jj, top_sim[keep], np.take_along_axis(orient, top, axis=1)[keep]))
    ii, jj, ss, oo = (np.concatenate(p) for p in zip(*parts))
    # (i, j) and (j, i) can both be found; keep one, stated as i < j with j's orientation
    # relative to i. Orientations are a group: if j needs o to match i, i needs o^-1.
    swap = ii > jj
    oo = np.where(swap, _INVERSE[oo], oo)
    ii, jj = np.where(swap, jj, ii), np.where(swap, ii, jj)
    pairs = np.zeros(len(ii), dtype)
    pairs["i"], pairs["j"], pairs["sim"], pairs["orient"] = ii, jj, ss, oo
    pairs = np.unique(pairs[["i", "j", "sim", "orient"]])  # sorts by i, j first
    first = np.ones(len(pairs), bool)
    first[1:] = (pairs["i"][1:] != pairs["i"][:-1]) | (pairs["j"][1:] != pairs["j"][:-1])
    pairs = pairs[first]
    return pairs[np.argsort(-pairs["sim"], kind="stable")]


def _inverse_orientations() -> np.ndarray:
    probe = np.arange(16).reshape(4, 4)
    inv = np.empty(8, np.int8)
    for o in range(8):
        for p in range(8):
            if np.array_equal(dihedral(dihedral(probe, o), p), probe):
                inv[o] = p
    return inv


_INVERSE = _inverse_orientations()


# ---------------------------------------------------------------------------- verification

def _gauss_kernel(sigma: float) -> np.ndarray:
    r = int(3 * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float32)
    k = np.exp(-x * x / (2 * sigma * sigma))
    return k / k.sum()


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    k = _gauss_kernel(sigma)
    r = len(k) // 2
    p = np.pad(x, r, mode="reflect")
    # separable convolution as sums of shifted copies: fast for these small kernels
    rows = sum(k[i] * p[:, i:i + x.shape[1]] for i in range(len(k)))
    return sum(k[i] * rows[i:i + x.shape[0], :] for i in range(len(k)))


def band_pass(x: np.ndarray, fine: float, coarse: float) -> np.ndarray:
    """Difference of Gaussians: edges and texture, without the silhouette or the exposure."""
    x = x.astype(np.float32)
    return _blur(x, fine) - _blur(x, coarse)


def _warps(x: np.ndarray, params: Iterable[tuple[float, float]]) -> np.ndarray:
    """x rotated by angle (degrees) and scaled by s about its centre, for each (angle, s)."""
    im = Image.fromarray(x.astype(np.float32), "F")
    n = x.shape[0]
    c = (n - 1) / 2
    out = []
    for angle, s in params:
        t = math.radians(angle)
        a, b = math.cos(t) / s, math.sin(t) / s
        # PIL maps output pixels to input ones: the inverse of rotate-then-scale about c
        out.append(np.asarray(im.transform((n, n), Image.AFFINE,
                                           (a, -b, c - a * c + b * c, b, a, c - b * c - a * c),
                                           Image.BILINEAR)))
    return np.stack(out)


def _best_ncc(images: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Max normalised cross-correlation of `template` over all placements inside each image.

    Correlations and the windows' sums come from one batch of FFTs (scipy's: several times
    faster than numpy's on these small batches).
    """
    n = images.shape[-1]
    m = template.shape[0]
    t = template - template.mean()
    tn = float(np.sqrt((t * t).sum()))
    if tn < 1e-9:
        return np.zeros(len(images))
    kernels = np.zeros((2, n, n), np.float32)
    kernels[0, :m, :m] = t[::-1, ::-1]
    kernels[1, :m, :m] = 1.0
    spec_k = sp_fft.rfft2(kernels)
    spec_i = sp_fft.rfft2(np.stack([images, images * images], axis=1))
    out = sp_fft.irfft2(spec_i * spec_k, s=(n, n))[..., m - 1:n, m - 1:n].astype(np.float64)
    cc, s2 = out[:, 0], out[:, 1]
    s1 = sp_fft.irfft2(spec_i[:, 0] * spec_k[1], s=(n, n))[..., m - 1:n, m - 1:n]
    sd = np.sqrt(np.maximum(s2 - s1 * s1 / (m * m), 0.0))
    ncc = np.where(sd > 1e-6 * tn, cc / np.maximum(sd, 1e-12) / tn, 0.0)
    return ncc.reshape(len(images), -1).max(axis=1)


def _centre(x: np.ndarray, frac: float = 0.7) -> np.ndarray:
    n = x.shape[0]
    m = int(round(n * frac))
    o = (n - m) // 2
    return x[o:o + m, o:o + m]


@dataclass(frozen=True)
class Match:
    score: float  # band-pass correlation at 128 px after alignment, in [-1, 1]
    angle: float
    scale: float


def match(a: np.ndarray, b: np.ndarray, orient: int) -> Match:
    """How well thumbnail b, turned by `orient`, rotated/scaled/shifted, reproduces a's centre."""
    b = dihedral(b, orient)
    half = THUMB // 2
    a64 = a.astype(np.float32).reshape(half, 2, half, 2).mean(axis=(1, 3))
    b64 = b.astype(np.float32).reshape(half, 2, half, 2).mean(axis=(1, 3))
    grid = [(ang, s) for s in SCALES for ang in ANGLES]
    coarse = _best_ncc(_warps(band_pass(b64, 0.7, 2.5), grid), _centre(band_pass(a64, 0.7, 2.5)))
    angle, scale = grid[int(coarse.argmax())]
    fine_grid = [(angle + da, scale * ds) for ds in (0.97, 1.0, 1.03) for da in (-1.25, 0.0, 1.25)]
    fine = _best_ncc(_warps(band_pass(b, 1.0, 4.0), fine_grid), _centre(band_pass(a, 1.0, 4.0)))
    k = int(fine.argmax())
    return Match(float(fine[k]), fine_grid[k][0], fine_grid[k][1])


def _match_pairs(args: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    a, b, orient = args
    return np.array([match(x, y, int(o)).score for x, y, o in zip(a, b, orient)], np.float32)


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
    links: np.ndarray  # verified pairs: structured (i, j, sim, orient) plus score
    checked: int  # candidate pairs that were verified


def near_duplicate_groups(thumbs: np.ndarray, *, executor=None, progress: Progress | None = None,
                          min_sim: float = CANDIDATE_SIM, min_score: float = MATCH_SCORE,
                          chunk: int = 256) -> NearGroups:
    """Group (N, THUMB, THUMB) thumbnails into near-duplicate groups (connected components).

    Candidates are verified best first and a pair already joined through others is skipped,
    which is what keeps verification near-linear in a heavily duplicated set. Each round
    verifies `chunk` pairs, in parallel when an `executor` is given.
    """
    n = len(thumbs)
    desc = np.stack([descriptors(t) for t in thumbs]) if n else np.zeros((0, 8, DCT_K ** 2))
    pairs = candidate_pairs(desc, min_sim)
    uf = UnionFind(n)
    links, scores = [], []
    checked = 0
    pos = 0
    while pos < len(pairs):
        batch = []
        while pos < len(pairs) and len(batch) < chunk:
            p = pairs[pos]
            pos += 1
            if uf.find(int(p["i"])) != uf.find(int(p["j"])):
                batch.append(p)
        if not batch:
            break
        batch = np.array(batch, dtype=pairs.dtype)
        got = _verify(thumbs, batch, executor)
        checked += len(batch)
        for p, s in zip(batch, got):
            if s >= min_score:
                uf.union(int(p["i"]), int(p["j"]))
                links.append(p)
                scores.append(s)
        if progress:
            progress("verify", pos, len(pairs))
    link_arr = np.zeros(len(links), [("i", np.int64), ("j", np.int64), ("sim", np.float32),
                                     ("orient", np.int8), ("score", np.float32)])
    if links:
        la = np.array(links, dtype=pairs.dtype)
        for name in ("i", "j", "sim", "orient"):
            link_arr[name] = la[name]
        link_arr["score"] = scores
    return NearGroups(uf.labels(), link_arr, checked)


def _verify(thumbs: np.ndarray, batch: np.ndarray, executor) -> np.ndarray:
    a, b, o = thumbs[batch["i"]], thumbs[batch["j"]], batch["orient"]
    if executor is None or len(batch) < 16:
        return _match_pairs((a, b, o))
    workers = getattr(executor, "_max_workers", 2)
    bounds = np.linspace(0, len(batch), workers * 2 + 1).astype(int)
    jobs = [(a[s:e], b[s:e], o[s:e]) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return np.concatenate(list(executor.map(_match_pairs, jobs)))
