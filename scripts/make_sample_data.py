#!/usr/bin/env python3
"""Write sample_data/: small synthetic radiograph phantoms that the project owns (CC0).

    python scripts/make_sample_data.py            # wipes and rewrites sample_data/
    python scripts/make_sample_data.py --out DIR  # somewhere else

Every phantom is drawn from a seed derived from its split, class and index, so the output is
the same on every run. `fractured` phantoms have a dark gap crossing the main bone with the
distal fragment displaced and angled; `not fractured` ones have an intact bone. Both classes
share every other property (sizes, brightness, number of bones, markers, file formats), so
the fracture is the only thing a model can learn. Needs numpy, Pillow and pydicom.
"""
from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

REPO = Path(__file__).resolve().parent.parent
COUNTS = {"train": 60, "val": 20, "test": 20}  # per class
CLASSES = ("fractured", "not fractured")
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root; entropy makes each UID fixed


# ---------------------------------------------------------------------------- drawing

def _smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below -0.5 px, 1 above +0.5 px: one pixel of antialiasing at every edge."""
    return np.clip(x + 0.5, 0.0, 1.0)


def _low_freq_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC),
                      dtype=np.float64)


def _bone(x: np.ndarray, y: np.ndarray, p0: np.ndarray, axis: np.ndarray, length: float,
          r: float, cortex: float, marrow: float) -> tuple[np.ndarray, np.ndarray]:
    """A long bone: a shaft of radius r with rounded knobs at both ends.

    Returns (intensity where the bone is, coverage in [0, 1]). The cortex (outer 30% of the
    radius) is brighter than the marrow, as on a radiograph.
    """
    dx, dy = x - p0[0], y - p0[1]
    u = dx * axis[0] + dy * axis[1]            # along the bone
    v = np.abs(-dx * axis[1] + dy * axis[0])   # across it
    inside_len = _smoothstep(np.minimum(u, length - u))
    cover = _smoothstep(r - v) * inside_len
    value = np.where(v < 0.7 * r, marrow, cortex)
    for end in (0.0, length):  # epiphyses: discs 1.35 r wide, cortex ring and marrow
        big = 1.35 * r
        d = np.hypot(u - end, v)
        knob = _smoothstep(big - d)
        knob_value = np.where(d < big - 0.3 * r, marrow * 1.05, cortex)
        value = np.where(knob > cover, knob_value, value)
        cover = np.maximum(cover, knob)
    return value, cover


def phantom(rng: np.random.Generator, h: int, w: int, fractured: bool) -> np.ndarray:
    """One synthetic radiograph, float64 (h, w) in [0, 1]."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    s = min(h, w)
    theta = rng.uniform(0, np.pi)
    axis = np.array([np.cos(theta), np.sin(theta)])
    normal = np.array([-axis[1], axis[0]])
    centre = np.array([w / 2, h / 2]) + rng.normal(0, 0.04, 2) * (w, h)
    # Half-length that keeps both ends inside a 12% margin of the image.
    room = min(min(hi - c, c - lo) / abs(a) for a, c, lo, hi in
               zip(axis, centre, (0.12 * w, 0.12 * h), (0.88 * w, 0.88 * h)) if abs(a) > 1e-6)
    half = rng.uniform(0.75, 0.95) * room
    r = rng.uniform(0.065, 0.09) * s
    p0 = centre - half * axis
    length = 2 * half

    # Dark background, a soft-tissue sleeve around the bone(s), smooth mottle.
    background = rng.uniform(0.05, 0.10)
    two_bones = rng.random() < 0.4
    offset = rng.choice([-1, 1]) * 2.3 * r
    tissue_r = rng.uniform(2.6, 3.4) * r + (abs(offset) / 2 if two_bones else 0)
    tissue_centre = p0 + (normal * offset / 2 if two_bones else 0)
    dx, dy = x - tissue_centre[0], y - tissue_centre[1]
    u = np.clip(dx * axis[0] + dy * axis[1], -r, length + r)  # nearest point on the limb axis
    d = np.hypot(dx - u * axis[0], dy - u * axis[1])
    sleeve = np.clip((tissue_r - d) / (0.3 * tissue_r), 0, 1)
    img = background + sleeve * rng.uniform(0.18, 0.26)
    img += 0.025 * _low_freq_noise(rng, h, w, 6)

    cortex, marrow = rng.uniform(0.82, 0.92), rng.uniform(0.55, 0.65)
    if two_bones:  # a thinner companion bone (radius/ulna, tibia/fibula), never broken
        value, cover = _bone(x, y, p0 + normal * offset + axis * 0.05 * length, axis,
                             0.9 * length, 0.6 * r, cortex * 0.97, marrow)
        img = img * (1 - cover) + value * cover
    value, cover = _bone(x, y, p0, axis, length, r, cortex, marrow)
    if fractured:
        value, cover = _fracture(rng, x, y, p0, axis, length, r, cortex, marrow, value, cover)
    trabecular = 1 + 0.04 * _low_freq_noise(rng, h, w, 12)
    img = img * (1 - cover) + value * trabecular * cover

    if rng.random() < 0.5:  # a lead side marker in a corner, in both classes alike
        mh, mw = max(6, s // 14), max(5, s // 18)
        top = 3 if rng.random() < 0.5 else h - mh - 3
        left = 3 if rng.random() < 0.5 else w - mw - 3
        img[top:top + mh, left:left + mw] = 0.97
        img[top + 2:top + mh - 2, left + 2:left + mw // 2] = background

    ramp = 1 + 0.08 * ((x / w) * np.cos(theta * 3) + (y / h) * np.sin(theta * 3))  # heel effect
    img = img * ramp + rng.normal(0, 0.005, (h, w))
    return np.clip(img, 0, 1)


def _fracture(rng, x, y, p0, axis, length, r, cortex, marrow, value, cover):
    """Cut the bone obliquely and move the distal fragment away, leaving a dark gap.

    The gap is 0.8..1.2 bone radii wide (several pixels even after shrinking the image to
    64 px); the fragment also shifts sideways by a third to two thirds of the radius and
    tilts 6..18 degrees. It moves away along the axis rather than losing bone to the gap, so
    the amount of bone, hence the image's brightness, is the same as in an intact phantom.
    """
    pf = p0 + rng.uniform(0.35, 0.65) * length * axis
    phi = np.deg2rad(rng.uniform(-35, 35))
    cut_n = np.array([axis[0] * np.cos(phi) - axis[1] * np.sin(phi),
                      axis[0] * np.sin(phi) + axis[1] * np.cos(phi)])
    gap = rng.uniform(0.8, 1.2) * r
    proximal = _smoothstep(-((x - pf[0]) * cut_n[0] + (y - pf[1]) * cut_n[1]))

    # Distal fragment: the same bone seen through a rigid motion about the fracture point.
    alpha = np.deg2rad(rng.uniform(6, 18)) * rng.choice([-1, 1])
    normal = np.array([-axis[1], axis[0]])
    move = gap * axis + rng.uniform(0.35, 0.65) * r * rng.choice([-1, 1]) * normal
    tx, ty = x - pf[0] - move[0], y - pf[1] - move[1]
    ca, sa = np.cos(-alpha), np.sin(-alpha)
    xs, ys = pf[0] + ca * tx - sa * ty, pf[1] + sa * tx + ca * ty  # inverse transform
    d_value, d_cover = _bone(xs, ys, p0, axis, length, r, cortex, marrow)
    d_cover = d_cover * _smoothstep((xs - pf[0]) * cut_n[0] + (ys - pf[1]) * cut_n[1])
    cover = cover * proximal
    value = np.where(d_cover > cover, d_value, value)
    return value, np.maximum(cover, d_cover)


# ---------------------------------------------------------------------------- writing

def _png16(path: Path, pixels: np.ndarray, significant_bits: int | None) -> None:
    info = PngInfo()
    if significant_bits:
        info.add(b"sBIT", bytes([significant_bits]))
    Image.fromarray(pixels.astype(np.uint16)).save(path, pnginfo=info, optimize=True)


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
                bits_stored: int = 12, **elements) -> None:
    """A minimal valid DICOM Secondary Capture (Explicit VR Little Endian) with fixed UIDs."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(UID_PREFIX, entropy_srcs=[path.name, "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(UID_PREFIX, entropy_srcs=[path.name, "study"])
    ds.SeriesInstanceUID = generate_uid(UID_PREFIX, entropy_srcs=[path.name, "series"])
    ds.Modality = "DX"
    ds.PatientName = "Phantom^Synthetic"
    ds.PatientID = "FXSCORE-PHANTOM"
    frames = pixels if pixels.ndim == 3 else pixels[None]
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = frames.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def _write(path: Path, img: np.ndarray, kind: str) -> Path:
    """Save a [0, 1] phantom in one of the formats hospitals and data sets use."""
    if kind == "jpg-rgb":  # grey stored as RGB JPEG, as most of the real data set is
        Image.fromarray(np.round(img * 255).astype(np.uint8)).convert("RGB").save(
            path, quality=92)
    elif kind in ("jpg", "jpeg"):
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path, quality=92)
    elif kind == "png":
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path, optimize=True)
    elif kind == "png12":  # 12-bit detector data in a 16-bit PNG, sBIT says so
        _png16(path, np.round(img * 4095), 12)
    elif kind == "tif16":
        Image.fromarray(np.round(img * 65535).astype(np.uint16)).save(
            path, compression="tiff_adobe_deflate", tiffinfo={317: 2})  # 317: Predictor
    elif kind == "dcm":  # 12-bit MONOCHROME2
        write_dicom(path, np.round(img * 4095).astype(np.uint16))
    elif kind == "dcm-mono1":  # stored inverted, with a rescale that the reader must undo
        write_dicom(path, np.round((1 - img) * 4095).astype(np.uint16),
                    photometric="MONOCHROME1", RescaleSlope=1, RescaleIntercept=0)
    else:
        raise ValueError(kind)
    return path


# Format of the i-th image of a class folder; test/ swaps TIFF for DICOM. 16-bit files are
# few because sensor noise in 12..16 bits does not compress: the folder must stay small.
_CYCLE = ["jpg-rgb", "jpg", "jpg", "jpeg", "png", "png", "jpg", "png12", "jpg", "tif16",
          "jpg-rgb", "jpg", "jpg", "jpeg", "png", "jpg", "jpg", "png", "jpg", "tif16"]
_SUFFIX = {"jpg-rgb": ".jpg", "jpg": ".jpg", "jpeg": ".jpeg", "png": ".png", "png12": ".png",
           "tif16": ".tif", "dcm": ".dcm", "dcm-mono1": ".dcm"}


def _size(rng: np.random.Generator) -> tuple[int, int]:
    h = int(rng.integers(96, 257))
    w = h if rng.random() < 0.6 else int(rng.integers(96, 257))
    return h, w


def make_split(out: Path, split: str, n: int) -> None:
    for ci, cls in enumerate(CLASSES):
        folder = out / split / cls
        folder.mkdir(parents=True)
        for i in range(n):
            rng = np.random.default_rng([20240607, ("train", "val", "test").index(split), ci, i])
            kind = _CYCLE[i % len(_CYCLE)]
            if split == "test" and kind == "tif16":
                kind = "dcm" if i % 20 < 10 else "dcm-mono1"
            h, w = _size(rng)
            img = phantom(rng, h, w, fractured=(cls == "fractured"))
            stem = f"{'fx' if cls == 'fractured' else 'ok'}_{split}_{i:03d}"
            _write(folder / (stem + _SUFFIX[kind]), img, kind)


def make_extras(out: Path) -> None:
    """One file per oddity the reader must handle, and three it must refuse."""
    ex = out / "extras"
    (ex / "broken").mkdir(parents=True)
    rng = np.random.default_rng([20240607, 99])
    img = phantom(rng, 160, 128, fractured=True)
    as8 = np.round(img * 255).astype(np.uint8)
    as12 = np.round(img * 4095).astype(np.uint16)

    write_dicom(ex / "mono2_12bit.dcm", as12)
    write_dicom(ex / "mono1_12bit.dcm", 4095 - as12, photometric="MONOCHROME1")
    # 16-bit stored values with a rescale to a 0..4095 output range.
    write_dicom(ex / "rescale_16bit.dcm", (as12.astype(np.uint32) * 16).astype(np.uint16),
                bits_stored=16, RescaleSlope=0.0625, RescaleIntercept=0)
    # A narrow window on the bone intensities: soft tissue goes black.
    write_dicom(ex / "windowed.dcm", as12, WindowCenter=int(0.7 * 4095),
                WindowWidth=int(0.5 * 4095))
    write_dicom(ex / "multiframe.dcm", np.stack([as12, 4095 - as12]))
    write_dicom(ex / "IM0001", as12)  # PACS exports often have no suffix at all
    Image.fromarray(as8).save(ex / "png_named.jpg", format="PNG")
    Image.fromarray(as8).save(ex / "phantom.gif", save_all=True,
                              append_images=[Image.fromarray(255 - as8)])
    rgba = Image.fromarray(as8).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(as8 > 20, 255, 0).astype(np.uint8)))
    rgba.save(ex / "rgba.png")
    Image.fromarray(as8).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(
        ex / "palette.png")
    # Stored on its side; EXIF Orientation 6 says "rotate 90 degrees clockwise to view".
    sideways = Image.fromarray(np.rot90(as8).copy())
    exif = sideways.getexif()
    exif[0x0112] = 6
    sideways.save(ex / "exif_rotated.jpg", quality=92, exif=exif.tobytes())
    _png16(ex / "png_12bit_in_16.png", as12, 12)
    # Uncompressed: with libtiff compression, Pillow writes MaxSampleValue as 1.
    Image.fromarray(as12).save(ex / "tiff_12bit_in_16.tif", tiffinfo={281: 4095})  # MaxSampleValue

    whole = io.BytesIO()
    Image.fromarray(as8).save(whole, format="PNG")
    (ex / "broken" / "truncated.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (ex / "broken" / "empty.jpg").write_bytes(b"")
    (ex / "broken" / "not_an_image.png").write_text("This is a text file, not a PNG.\n")


README = """\
# sample_data: synthetic radiograph phantoms (project-owned, CC0)

Everything here is **synthetic**, drawn by `scripts/make_sample_data.py` from fixed seeds;
no patient data, no third-party images. Licence: CC0 1.0 (public domain dedication).
Regenerate with `python scripts/make_sample_data.py` (it wipes and rewrites this folder).

## Layout
    {train,val,test}/{fractured,not fractured}/   @train / @val / @test images per class
    extras/                                       one file per format oddity
    extras/broken/                                files that must be refused

Each image is a dark background with a soft-tissue sleeve and one or two long bones (bright
cortex, darker marrow, rounded ends) at a random angle, 96..256 px a side, some non-square,
with noise, a heel-effect ramp and sometimes a side marker. In `fractured` the main bone has
a dark oblique gap (0.8..1.2 bone radii wide) with the distal fragment shifted and tilted;
`not fractured` bones are intact. Brightness, sizes, markers and formats are the same for
both classes, so the fracture is the only signal.

Formats in the class folders: 8-bit JPEG (grey and RGB-stored grey), 8-bit PNG, 12-bit
values in 16-bit PNG (with an sBIT chunk), 16-bit TIFF (train/val), 12-bit DICOM
MONOCHROME2 and MONOCHROME1 (test).

## extras/
| file | what it tests |
|---|---|
| mono2_12bit.dcm | DICOM MONOCHROME2, 12 bits stored in 16 |
| mono1_12bit.dcm | DICOM MONOCHROME1 (inverted); reads the same as mono2_12bit.dcm |
| rescale_16bit.dcm | 16 bits stored, RescaleSlope 1/16; reads like mono2_12bit.dcm |
| windowed.dcm | Window Center/Width on the bone range; soft tissue goes black |
| multiframe.dcm | two frames; the first is read |
| IM0001 | DICOM without a suffix (found by the DICM marker) |
| png_named.jpg | a PNG named .jpg |
| phantom.gif | two-frame GIF; the first frame is read |
| rgba.png | RGBA with a transparent background; alpha is ignored |
| palette.png | P mode (64-colour palette) |
| exif_rotated.jpg | stored sideways, EXIF Orientation 6; reads upright (160x128) |
| png_12bit_in_16.png | 12-bit data in a 16-bit PNG with sBIT = 12 |
| tiff_12bit_in_16.tif | 12-bit data in a 16-bit TIFF with MaxSampleValue = 4095 |
| broken/truncated.png | the second half is missing: must be an error, not half grey |
| broken/empty.jpg | zero bytes |
| broken/not_an_image.png | a text file |
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "sample_data")
    args = ap.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    for split, n in COUNTS.items():
        make_split(args.out, split, n)
    make_extras(args.out)
    readme = README
    for split, n in COUNTS.items():
        readme = readme.replace(f"@{split}", str(n))
    (args.out / "README.md").write_text(readme)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {sum(1 for p in args.out.rglob('*') if p.is_file())} files, "
          f"{total / 1e6:.2f} MB, to {args.out}")


if __name__ == "__main__":
    main()
