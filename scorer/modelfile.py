"""An fxscore model file: the ONNX bytes, the contract metadata, and the digest that binds them.

Format version 2 of the contract (`fxscore.contract`) stores a digest in the metadata JSON:

    "digest": "sha256:<64 hex digits>"

    sha256( b"fxscore-model-digest/1\\n"
            + u64le(len(body)) + body
            + u64le(len(meta)) + meta )

`body` is the serialised ONNX ModelProto minus its metadata entries: every top-level protobuf
record of the file except field 14 (`metadata_props`), in file order, bytes as stored. So it
covers every initializer (all weights), the graph's nodes, inputs and outputs, the opsets, the
IR version and doc strings: everything except the key/value metadata. `meta` is the fxscore
metadata JSON without its `digest` key, re-serialised canonically (sorted keys, no spaces,
ASCII), so the class names, positive class, preprocessing and threshold are covered too.

The scorer verifies the digest at load with a few lines of protobuf wire-format parsing here,
without importing the `onnx` package (which alone takes over a second to import); hashing a
45 MB fp32 ResNet18 takes about 0.1 s.

What it is for: a file damaged in transit or storage, truncated, or edited by hand (a threshold
or positive class changed, weights patched) is refused at load with a clear message instead of
scoring a night's X-rays silently wrong. What it is not: a defence against a determined
attacker. Anyone who can write the file can recompute the digest, since the scheme is public and
there is no secret key; trust in a model file must come from where it came from (a signed
release, a checksum published out of band, a read-only model store). The packaged default model
is additionally pinned by the sha256 of its whole file (`fxscore.models.DEFAULT_SHA256`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .contract import DIGEST_KEY, FORMAT_VERSION, META_KEY, ContractError, ModelMeta

if TYPE_CHECKING:  # onnx is only needed by callers that hold a ModelProto
    import onnx

DIGEST_PREFIX = "sha256:"
_DOMAIN = b"fxscore-model-digest/1\n"
_METADATA_FIELD = 14  # ModelProto.metadata_props
_KEY_FIELD, _VALUE_FIELD = 1, 2  # StringStringEntryProto.key / .value


class DigestError(ContractError):
    """A model's digest is missing, malformed, or does not match its contents."""


# ---------------------------------------------------------------------------- reading


def read_props(data: bytes) -> dict[str, str]:
    """The ONNX metadata_props of a serialised model, key -> value (a repeated key is an error)."""
    props: dict[str, str] = {}
    for field, start, end, payload in _records(data):
        if field != _METADATA_FIELD:
            continue
        key, value = _entry(data[payload:end])
        if key in props:
            raise ContractError(f"metadata key '{key}' appears twice")
        props[key] = value
    return props


def digest_of(data: bytes, meta: dict[str, Any]) -> str:
    """The digest of a serialised model `data` with fxscore metadata `meta` (digest key ignored)."""
    view = memoryview(data)  # slices of it are hashed in place: no copy of 45 MB of weights
    body = [view[start:end] for field, start, end, _ in _records(data)
            if field != _METADATA_FIELD]
    canonical = canonical_json(meta).encode("ascii")
    h = hashlib.sha256(_DOMAIN)
    h.update(sum(len(part) for part in body).to_bytes(8, "little"))
    for part in body:
        h.update(part)
    h.update(len(canonical).to_bytes(8, "little"))
    h.update(canonical)
    return DIGEST_PREFIX + h.hexdigest()


def canonical_json(meta: dict[str, Any]) -> str:
    """The metadata as the digest sees it: without the digest, sorted keys, no whitespace, ASCII."""
    rest = {k: v for k, v in meta.items() if k != DIGEST_KEY}
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=True)


def check_digest(data: bytes, meta: dict[str, Any]) -> str:
    """Verify the digest stored in `meta` against `data`; return it, or raise DigestError."""
    stored = meta.get(DIGEST_KEY)
    if stored is None:
        raise DigestError(f"format version {meta.get('format_version')} metadata carries no "
                          f"'{DIGEST_KEY}'; re-export the model with `fxscore export` (or wrap it "
                          "with fxscore.modelfile.write_model)")
    computed = digest_of(data, meta)
    if stored != computed:
        raise DigestError(
            "its contents do not match the digest recorded when it was made: the weights, graph "
            "or metadata were changed afterwards (a damaged copy, or a hand edit). Restore the "
            "file from its source or re-export it; do not score with it "
            f"(recorded {stored[:19]}..., contents {computed[:19]}...)")
    return stored


# ---------------------------------------------------------------------------- writing


def embed_bytes(data: bytes, meta: ModelMeta) -> bytes:
    """A serialised model with `meta` and its digest as the fxscore metadata (format version 2; 3
    when it pads, see `fxscore.contract`).

    Any earlier fxscore entry is replaced; other metadata entries are kept. Works on bytes, so
    wrapping a model needs neither onnx nor torch.
    """
    if meta.format_version != FORMAT_VERSION:
        import dataclasses

        meta = dataclasses.replace(meta, format_version=FORMAT_VERSION)
    kept = []
    for field, start, end, payload in _records(data):
        if field == _METADATA_FIELD and _entry(data[payload:end])[0] == META_KEY:
            continue
        kept.append(data[start:end])
    stripped = b"".join(kept)
    d = meta.to_dict()
    d[DIGEST_KEY] = digest_of(stripped, d)
    try:
        value = json.dumps(d, sort_keys=True, allow_nan=False)
    except ValueError as e:  # NaN or infinity in the free-form training summary
        raise ContractError(f"metadata cannot be written as JSON: {e}") from e
    entry = (_tag(_KEY_FIELD) + _len_prefixed(META_KEY.encode("utf-8"))
             + _tag(_VALUE_FIELD) + _len_prefixed(value.encode("utf-8")))
    return stripped + _tag(_METADATA_FIELD) + _len_prefixed(entry)


def with_entry(data: bytes, key: str, value: str) -> bytes:
    """A serialised model with metadata entry `key` set to `value` (an earlier one replaced).

    Not covered by the digest, which leaves every metadata entry out: a caller that must bind
    the entry to the model records its sha256 in the fxscore metadata (`fxscore.membership`).
    """
    if key == META_KEY:
        raise ValueError(f"'{META_KEY}' is written by embed_bytes, with its digest")
    kept = [data[start:end] for field, start, end, payload in _records(data)
            if not (field == _METADATA_FIELD and _entry(data[payload:end])[0] == key)]
    entry = (_tag(_KEY_FIELD) + _len_prefixed(key.encode("utf-8"))
             + _tag(_VALUE_FIELD) + _len_prefixed(value.encode("utf-8")))
    return b"".join(kept) + _tag(_METADATA_FIELD) + _len_prefixed(entry)


def embed(proto: "onnx.ModelProto", meta: ModelMeta) -> "onnx.ModelProto":
    """Write `meta` and its digest into `proto` (in place; also returned). Nothing may change
    `proto` afterwards, or its digest no longer matches."""
    proto.ParseFromString(embed_bytes(proto.SerializeToString(), meta))
    return proto


ModelSource = Union["onnx.ModelProto", bytes]


def write_model(model: ModelSource, meta: ModelMeta, path: str | os.PathLike) -> Path:
    """Write `model` (a ModelProto or its bytes) with `meta` and digest to `path`, atomically.

    The file appears complete or not at all (`fxscore.atomicfile`: a temporary beside it,
    fsync, rename).
    """
    from .atomicfile import write_files

    data = model if isinstance(model, (bytes, bytearray)) else model.SerializeToString()
    out = embed_bytes(bytes(data), meta)
    return write_files({Path(path): out})[0]


# ---------------------------------------------------------------------------- wire format


def _records(data: bytes):
    """(field number, record start, record end, payload start) of each top-level record."""
    pos, n = 0, len(data)
    while pos < n:
        start = pos
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
            payload = pos
        elif wire == 1:
            payload, pos = pos, pos + 8
        elif wire == 2:
            length, payload = _varint(data, pos)
            pos = payload + length
        elif wire == 5:
            payload, pos = pos, pos + 4
        else:
            raise ContractError(f"not an ONNX model: protobuf wire type {wire} at byte {start}")
        if pos > n or field == 0:
            raise ContractError(f"not an ONNX model: protobuf record at byte {start} is cut off")
        yield field, start, pos, payload


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ContractError(f"not an ONNX model: bad protobuf varint at byte {pos}")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _entry(data: bytes) -> tuple[str, str]:
    """A StringStringEntryProto -> (key, value)."""
    fields = {1: b"", 2: b""}
    for field, _, end, payload in _records(data):
        if field in fields:
            fields[field] = data[payload:end]
    try:
        return fields[1].decode("utf-8"), fields[2].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ContractError("a metadata entry is not valid UTF-8") from e


def _tag(field: int) -> bytes:
    return _encode_varint(field << 3 | 2)


def _len_prefixed(payload: bytes) -> bytes:
    return _encode_varint(len(payload)) + payload


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
