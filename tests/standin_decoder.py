"""A stand-in for `fxscore.isolate.decode_preprocessed` that crashes or hangs on request.

It lives in its own small module because the decoder worker processes import it by name.
A file whose name contains "crash" segfaults the worker, "hang" never returns; any other file
is decoded by the real function.
"""
from __future__ import annotations

import ctypes
import os
import time
from typing import Any

from fxscore.isolate import decode_preprocessed


def decode(data: bytes, name: str, params: Any) -> Any:
    base = os.path.basename(name)  # the folders may be called anything
    if "crash" in base:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if "hang" in base:
        time.sleep(10_000)
    return decode_preprocessed(data, name, params)
