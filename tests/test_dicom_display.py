"""What radiographs carry: Presentation LUT Shape INVERSE and pixel padding (fxscore.dicom)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset

from fxscore.images import read_image

STORED = np.array([[0, 100, 200, 300], [400, 500, 600, 4095]], dtype=np.uint16)


def dicom(pixels=STORED, *, photometric="MONOCHROME2", signed=False, bits=12, **attrs):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, int(signed)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return read_image(buf, name="x.dcm")


def test_presentation_lut_inverse_shows_a_monochrome2_image_inverted():
    plain = dicom()
    assert np.allclose(dicom(PresentationLUTShape="INVERSE"), 1 - plain, atol=1e-7)
    assert np.array_equal(dicom(PresentationLUTShape="IDENTITY"), plain)


def test_monochrome1_with_inverse_is_inverted_once():
    """DX files state MONOCHROME1 and INVERSE together for one inversion (PS3.3 C.8.11.6.1)."""
    plain = dicom()
    mono1 = dicom(photometric="MONOCHROME1")
    assert np.allclose(mono1, 1 - plain, atol=1e-7)
    assert np.array_equal(dicom(photometric="MONOCHROME1", PresentationLUTShape="INVERSE"), mono1)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_padding_pixels_are_black_whatever_the_window(photometric):
    plain = dicom(photometric=photometric, WindowCenter=300, WindowWidth=400)
    padded = dicom(photometric=photometric, WindowCenter=300, WindowWidth=400,
                   PixelPaddingValue=0)
    assert padded[0, 0] == 0.0  # MONOCHROME1 would have shown stored 0 white
    keep = STORED != 0
    assert np.allclose(padded[keep], plain[keep], rtol=0, atol=1e-6)


def test_a_padding_range_covers_every_value_between_value_and_limit():
    out = dicom(PixelPaddingValue=600, PixelPaddingRangeLimit=400)  # the order does not matter
    plain = dicom()
    band = (STORED >= 400) & (STORED <= 600)
    assert np.all(out[band] == 0.0)
    assert np.allclose(out[~band], plain[~band], rtol=0, atol=1e-6) and np.any(plain[band] > 0)


def test_signed_padding_below_the_window_of_a_ct_like_image():
    stored = np.array([[-2000, -1000, 0, 40], [80, 400, 1000, 3000]], dtype=np.int16)
    kw = dict(pixels=stored, signed=True, bits=16, RescaleSlope=1, RescaleIntercept=0,
              WindowCenter=40, WindowWidth=400)
    plain, padded = dicom(photometric="MONOCHROME1", **kw), dicom(photometric="MONOCHROME1",
                                                                   PixelPaddingValue=-2000, **kw)
    assert plain[0, 0] == 1.0 and padded[0, 0] == 0.0
    assert np.allclose(padded.ravel()[1:], plain.ravel()[1:], rtol=0, atol=1e-6)


def test_eight_bit_images_take_the_same_rules():
    stored = np.array([[0, 10], [200, 255]], dtype=np.uint8)
    out = dicom(stored, bits=8, photometric="MONOCHROME1", PixelPaddingValue=0)
    assert out[0, 0] == 0.0 and out[1, 1] == 0.0  # padding black; stored 255 in MONOCHROME1 too
    assert out[0, 1] == pytest.approx(1 - 10 / 255, abs=1e-6)
