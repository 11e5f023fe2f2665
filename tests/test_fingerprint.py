"""fxscore.fingerprint: exact hashes, descriptors, verification and grouping of near copies."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from fxscore import fingerprint as fp


def texture(seed: int, size: int = 200) -> np.ndarray:
    """A radiograph-like picture: a bright blurred 'bone' over multi-scale texture, in [0, 1].

    Independent seeds give unrelated pictures, so anything grouped across seeds is a false
    merge; the copies of one seed must all be grouped.
    """
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.float32)
    for sigma in (2, 6, 16):
        noise = Image.fromarray(rng.normal(size=(size, size)).astype(np.float32), "F")
        img += np.asarray(noise.resize((size // sigma, size // sigma)).resize((size, size),
                                                                               Image.BICUBIC))
    y, x = np.mgrid[:size, :size] / size
    angle = rng.uniform(0, np.pi)
    dist = np.abs((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle))
    img += 3 * np.exp(-(dist / 0.12) ** 2)
    img -= img.min()
    return img / img.max()


def to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray((img * 255).round().astype(np.uint8), "L")


def from_pil(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("L"), np.float32) / 255


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf)


# Every kind of near copy the issue names; each maps a PIL image to its copy.
COPIES = {
    "rotate90": lambda im: im.transpose(Image.ROTATE_90),
    "rotate180": lambda im: im.transpose(Image.ROTATE_180),
    "flip": lambda im: im.transpose(Image.FLIP_LEFT_RIGHT),
    "transpose": lambda im: im.transpose(Image.TRANSPOSE),
    "half_size": lambda im: im.resize((im.width // 2, im.height // 2), Image.BILINEAR),
    "jpeg_q70": lambda im: jpeg(im, 70),
    "rotate_5": lambda im: im.rotate(5, Image.BILINEAR),
    "rotate_-10": lambda im: im.rotate(-10, Image.BILINEAR),
    "crop_5pc": lambda im: im.crop((im.width // 20, im.height // 20, im.width, im.height)),
    "crop_10pc_one_side": lambda im: im.crop((im.width // 10, 0, im.width, im.height)),
    "brighter_flatter": lambda im: ImageEnhance.Contrast(
        ImageEnhance.Brightness(im).enhance(1.3)).enhance(0.7),
}


def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 5000  # more than one read chunk
    p = tmp_path / "x.bin"
    p.write_bytes(data)
    assert fp.sha256_file(p, chunk=4096) == hashlib.sha256(data).hexdigest()


def test_thumbnail_takes_the_central_square_and_stretches():
    img = np.zeros((300, 100), np.float32)
    img[100:200] = 0.5  # the central 100 x 100 square, all one value ...
    img[150, 50] = 0.6  # ... but one pixel
    t = fp.thumbnail(img)
    assert t.shape == (fp.THUMB, fp.THUMB) and t.dtype == np.uint8
    assert t.max() == 255 and t.min() == 0  # stretched: the narrow range fills 0..255
    assert fp.thumbnail(np.full((50, 80), 0.3, np.float32)).max() == 0  # flat: no division


@pytest.mark.parametrize("orient", range(8))
def test_descriptor_rows_describe_the_eight_orientations(orient):
    t = fp.thumbnail(texture(1))
    turned = fp.descriptors(fp.dihedral(t, orient))[0]
    np.testing.assert_allclose(turned, fp.descriptors(t)[orient], atol=1e-5)


def test_candidate_pairs_rank_copies_first_and_skip_self_pairs():
    thumbs = [fp.thumbnail(texture(s)) for s in range(20)]
    thumbs.append(fp.dihedral(thumbs[3], 5))  # a turned copy of image 3 as image 20
    pairs = fp.candidate_pairs(np.stack([fp.descriptors(t) for t in thumbs]))
    assert (pairs["i"] < pairs["j"]).all()
    assert len(set(zip(pairs["i"].tolist(), pairs["j"].tolist()))) == len(pairs)
    assert (np.diff(pairs["sim"]) <= 0).all()
    assert (pairs["i"][0], pairs["j"][0]) == (3, 20) and pairs["sim"][0] > 0.999


@pytest.mark.parametrize("kind", sorted(COPIES))
def test_match_accepts_every_kind_of_near_copy(kind):
    original = texture(7, size=240)
    copy = from_pil(COPIES[kind](to_pil(original)))
    m = fp.match(fp.thumbnail(original), fp.thumbnail(copy))
    assert m.score >= fp.MATCH_SCORE, (kind, m)


def test_match_rejects_an_unrelated_picture():
    a, b = texture(11), texture(12)
    m = fp.match(fp.thumbnail(a), fp.thumbnail(b))
    assert m.score < fp.MATCH_SCORE - 0.2, m


def test_near_duplicate_groups_join_copies_and_only_copies():
    originals = [texture(s) for s in range(12)]
    thumbs, truth = [], []
    for k, img in enumerate(originals):
        thumbs.append(fp.thumbnail(img))
        truth.append(k)
    for k, kind in zip((0, 0, 5, 9), ("rotate90", "crop_5pc", "rotate_-10", "jpeg_q70")):
        thumbs.append(fp.thumbnail(from_pil(COPIES[kind](to_pil(originals[k])))))
        truth.append(k)
    near = fp.near_duplicate_groups(np.stack(thumbs))
    # the same partition: label equality <=> truth equality, pair by pair
    same = near.labels[:, None] == near.labels[None, :]
    truth = np.array(truth)
    np.testing.assert_array_equal(same, truth[:, None] == truth[None, :])
    assert near.checked >= len(near.links) >= 3


def test_near_duplicate_groups_of_nothing_and_of_one():
    assert len(fp.near_duplicate_groups(np.zeros((0, fp.THUMB, fp.THUMB), np.uint8)).labels) == 0
    one = fp.near_duplicate_groups(fp.thumbnail(texture(0))[None])
    assert one.labels.tolist() == [0] and one.links == []
