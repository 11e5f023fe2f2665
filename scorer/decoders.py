"""Which DICOM transfer syntaxes decode, with which package, under which licence.

pydicom 3 decodes pixel data through plugins. fxscore's core install brings permissively
licensed ones for every transfer syntax common in radiography (see DECODERS). One gap is filled
here: pydicom's GDCM plugin refuses JPEG Extended with 12-bit samples (1.2.840.10008.1.2.4.51,
common in older CR/DX archives), although GDCM itself decodes them correctly (checked against
DCMTK's `dcmdjpeg` in tests/test_dicom_corpus.py). `install()` registers GDCM, without that
refusal, as the first plugin for that syntax (were it last, pydicom would log a refusal with a
traceback from each plugin before it, for every 12-bit file). The only other pydicom plugin for
12-bit JPEG is pylibjpeg-libjpeg, which is GPL-3 and therefore not a core dependency.

This module is itself the plugin module pydicom imports (it needs `is_available` and
`DECODER_DEPENDENCIES` at module level).
"""
from __future__ import annotations

import threading
from typing import Any

from pydicom import uid

# transfer syntax -> (decoding packages in pydicom's order of preference, their licences)
DECODERS: dict[str, tuple[str, str]] = {
    uid.ImplicitVRLittleEndian: ("pydicom", "MIT"),
    uid.ExplicitVRLittleEndian: ("pydicom", "MIT"),
    uid.ExplicitVRBigEndian: ("pydicom", "MIT"),
    uid.DeflatedExplicitVRLittleEndian: ("pydicom + zlib", "MIT, zlib"),
    uid.RLELossless: ("pylibjpeg-rle, pydicom", "MIT"),
    uid.JPEGBaseline8Bit: ("python-gdcm, Pillow", "BSD-3 (GDCM), MIT-CMU (Pillow)"),
    uid.JPEGExtended12Bit: ("python-gdcm (8 bit: also Pillow; 12 bit: fxscore's GDCM plugin)",
                            "BSD-3 (GDCM)"),
    uid.JPEGLossless: ("python-gdcm", "BSD-3"),
    uid.JPEGLosslessSV1: ("python-gdcm", "BSD-3"),
    uid.JPEGLSLossless: ("python-gdcm, pyjpegls (CharLS)", "BSD-3, MIT (CharLS: BSD-3)"),
    uid.JPEGLSNearLossless: ("python-gdcm, pyjpegls (CharLS)", "BSD-3, MIT (CharLS: BSD-3)"),
    uid.JPEG2000Lossless: ("python-gdcm, Pillow, pylibjpeg-openjpeg",
                           "BSD-3, MIT-CMU, MIT (OpenJPEG: BSD-2)"),
    uid.JPEG2000: ("python-gdcm, Pillow, pylibjpeg-openjpeg",
                   "BSD-3, MIT-CMU, MIT (OpenJPEG: BSD-2)"),
    uid.HTJ2KLossless: ("pylibjpeg-openjpeg", "MIT (OpenJPEG: BSD-2)"),
    uid.HTJ2KLosslessRPCL: ("pylibjpeg-openjpeg", "MIT (OpenJPEG: BSD-2)"),
    uid.HTJ2K: ("pylibjpeg-openjpeg", "MIT (OpenJPEG: BSD-2)"),
}

PLUGIN_LABEL = "fxscore-gdcm12"
# pydicom's own JPEG Extended plugins, in its order of preference
_PYDICOM_PLUGINS = {
    "gdcm": ("pydicom.pixels.decoders.gdcm", "_decode_frame"),
    "pylibjpeg": ("pydicom.pixels.decoders.pylibjpeg", "_decode_frame"),
    "pillow": ("pydicom.pixels.decoders.pillow", "_decode_frame"),
}
DECODER_DEPENDENCIES = {uid.JPEGExtended12Bit: ("python-gdcm>=3.0.10",)}
_lock = threading.Lock()
_installed = False


def is_available(transfer_syntax: str) -> bool:
    """pydicom's plugin protocol: can this module decode `transfer_syntax` here?"""
    if transfer_syntax not in DECODER_DEPENDENCIES:
        return False
    import importlib.util
    return importlib.util.find_spec("gdcm") is not None


def install() -> None:
    """Register fxscore's extra plugin with pydicom and quieten GDCM; idempotent, thread-safe.

    Called by the DICOM reader before it decodes, in every process that decodes (worker
    processes import afresh).
    """
    global _installed
    if _installed:
        return
    with _lock:
        if _installed:
            return
        from pydicom.pixels import get_decoder

        decoder = get_decoder(uid.JPEGExtended12Bit)
        if PLUGIN_LABEL not in decoder.available_plugins and is_available(uid.JPEGExtended12Bit):
            # pydicom tries plugins in the order they were added: take the others out, add
            # ours, put them back after it.
            others = [label for label in _PYDICOM_PLUGINS if label in decoder.available_plugins]
            for label in others:
                decoder.remove_plugin(label)
            decoder.add_plugin(PLUGIN_LABEL, (__name__, "decode_frame"))
            for label in others:
                decoder.add_plugin(label, _PYDICOM_PLUGINS[label])
        _quiet_gdcm()
        _installed = True


def _quiet_gdcm() -> None:
    # GDCM prints diagnostics to stderr (e.g. "Unsupported JPEG data precision 12" before it
    # retries with its 12-bit decoder and succeeds); a batch job's log should carry ours only.
    try:
        import gdcm
    except ImportError:
        return
    gdcm.Trace.WarningOff()
    gdcm.Trace.ErrorOff()
    gdcm.Trace.DebugOff()


def decode_frame(src: bytes, runner: Any) -> bytes:
    """One encoded JPEG Extended frame -> its decoded bytes (pydicom's decoder plugin API).

    pydicom's own GDCM plugin, less its refusal of 12-bit samples.
    """
    import gdcm

    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())

    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(element)
    pi = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi))
    if runner.samples_per_pixel > 1:
        image.SetPlanarConfiguration(runner.planar_configuration)
    ts = gdcm.TransferSyntax.GetTSType(str.__str__(runner.transfer_syntax))
    image.SetTransferSyntax(gdcm.TransferSyntax(ts))
    bits = runner.bits_stored
    image.SetPixelFormat(gdcm.PixelFormat(runner.samples_per_pixel, runner.bits_allocated, bits,
                                          bits - 1, runner.pixel_representation))
    buffer = image.GetBuffer()
    if buffer is None:  # GDCM signals a failed decode with no buffer
        raise ValueError("GDCM could not decode the JPEG Extended data")
    expected = runner.frame_length(unit="bytes")
    frame = buffer.encode("utf-8", "surrogateescape")  # GDCM hands char* back as str
    if len(frame) < expected:
        raise ValueError(f"GDCM returned {len(frame)} bytes for a {expected}-byte frame")
    return frame


def support() -> list[dict[str, Any]]:
    """One entry per transfer syntax in DECODERS: name, uid, available (a plugin is installed
    here), plugins (pydicom's labels), packages and licences."""
    install()
    from pydicom.pixels import get_decoder

    out = []
    for ts, (packages, licences) in DECODERS.items():
        decoder = get_decoder(uid.UID(ts))
        out.append({"name": uid.UID(ts).name, "uid": str(ts), "available": decoder.is_available,
                    "plugins": list(decoder.available_plugins) if decoder.is_encapsulated
                    else ["pydicom"], "packages": packages, "licences": licences})
    return out
