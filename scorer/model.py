"""Loading an fxscore ONNX model into onnxruntime, with everything checked before any file is read.

A model that is missing, is not ONNX, carries no fxscore metadata, whose metadata holds a number
out of range, whose digest does not match its contents, or whose graph disagrees with its
metadata fails here with a `ModelError` naming the file and the fix, not halfway through a
night's batch job. The file is read once: the bytes hashed (model id, digest, the packaged
model's pin) are the bytes onnxruntime runs, or (from a model's second load on this CPU) the
graph onnxruntime optimised from a file with that same digest, verified again on every load
(`fxscore.sessioncache`).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from . import modelfile, sessioncache
from .contract import DIGEST_KEY, ContractError, ModelMeta, metadata_dict
from .cpus import available_cpus  # noqa: F401 - re-exported: fxscore.model.available_cpus
from .hashing import sha256_bytes
from .models import DEFAULT_SHA256

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

MODEL_ENV = "FXSCORE_MODEL"
DEFAULT_MODEL = "default.onnx"  # inside the fxscore.models package
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
MAX_MODEL_BYTES = 2 << 30  # protobuf's limit for one ONNX file; fxscore models are single files


class ModelError(Exception):
    """A model file cannot be used for scoring; the message names the file and the fix."""


@dataclass(frozen=True, eq=False)
class Model:
    session: ort.InferenceSession
    meta: ModelMeta
    model_id: str  # first 12 hex digits of the file's sha256: ties every output row to a model
    path: Path
    verified: bool = False  # its digest matched, or it is the pinned packaged default model
    integrity: str = "unverified"  # one line for the user: how (or whether) it was verified
    # the file's metadata_props, as verified: a session from the graph cache may not keep them
    props: dict[str, str] | None = None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """NCHW float32 batch -> probability of the positive class, shape [N].

        Anything but a probability (a NaN, an infinity, a value outside [0, 1]) is a ModelError:
        such a model would write numbers that look like scores and label them.
        """
        # Only the probability is fetched: a model with heatmap outputs costs what it did.
        name = self.meta.outputs.get("probability") or self.session.get_outputs()[0].name
        out = self.session.run([name], {self.meta.input_name: batch})[0]
        return self.check_probabilities(out, len(batch))

    def predict_with(self, batch: np.ndarray, roles: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Like `predict`, fetching only the outputs named by `roles` ("probability",
        "feature_map", "pooled", "ood_score"; `fxscore.graph_outputs`) -> {role: array}.

        A role this model lacks raises `graph_outputs.MissingOutput`, naming the fix.
        """
        from .graph_outputs import run_outputs

        return run_outputs(self, batch, roles)

    def check_probabilities(self, out: np.ndarray, n: int) -> np.ndarray:
        """The graph's probability output for a batch of `n` -> shape [N], or a ModelError."""
        out = np.asarray(out, dtype=np.float32)
        if out.size != n:
            raise ModelError(f"{self.path}: model returned shape {out.shape} for a batch of "
                             f"{n}; an fxscore model returns one probability per image")
        out = out.reshape(n)
        bad = ~((out >= 0) & (out <= 1))  # NaN fails both comparisons
        if bad.any():
            i = int(np.argmax(bad))
            raise ModelError(_not_a_probability(self.path, float(out[i]), i, n))
        return out

    def label(self, probability: float) -> str:
        meta = self.meta
        return meta.positive_class if probability >= meta.threshold else meta.negative_class


def _not_a_probability(path: Path, value: float, index: int, n: int) -> str:
    where = f"image {index + 1} of a batch of {n}"
    if np.isfinite(value):
        why = ("the graph returns logits, not probabilities (an fxscore graph ends in a "
               "Sigmoid)")
    else:
        why = ("the graph's arithmetic is broken (NaN or infinite weights), or it returns "
               "logits, not probabilities")
    return (f"model {path} returned {value:g} for {where}, not a probability in [0, 1]: {why}; "
            "re-export it with `fxscore export`. No score was written for this batch")


def packaged_model() -> tuple[Traversable, str]:
    """(where the packaged default model is, the sha256 this release pins for it).

    A function so that tests can point the loader at a copy.
    """
    from importlib import resources  # ~5 ms of imports: only a run without --model pays

    return resources.files("fxscore.models") / DEFAULT_MODEL, DEFAULT_SHA256


def load_model(path: str | Path | None = None, *, providers: tuple[str, ...] = ("cpu",),
               threads: int | None = None) -> Model:
    """Open an fxscore ONNX model: `path`, else $FXSCORE_MODEL, else the packaged default model.

    `providers` are short names ("cpu", "cuda") or onnxruntime provider names; `threads` is the
    intra-op thread count (default: `available_cpus()`). A format-version-2 model's digest is
    verified; the packaged default model must match the sha256 pinned in this release.
    """
    if path is None and os.environ.get(MODEL_ENV):
        path = os.environ[MODEL_ENV]
        source = f"{MODEL_ENV}={path}"
    else:
        source = str(path)
    if path is not None:
        return _load(Path(path), source, providers, threads)
    from importlib import resources

    packaged, pinned = packaged_model()
    if not packaged.is_file():
        raise ModelError(f"no model given and this fxscore has no packaged default model: pass "
                         f"--model PATH (an ONNX file made by `fxscore export`) or set {MODEL_ENV}")
    with resources.as_file(packaged) as p:
        return _load(Path(p), f"packaged default model {p}", providers, threads, pinned=pinned)


def _load(path: Path, source: str, providers: tuple[str, ...], threads: int | None,
          pinned: str | None = None) -> Model:
    if not path.exists():
        raise ModelError(f"model {source} does not exist; pass --model PATH to an ONNX file "
                         "made by `fxscore export`")
    if not path.is_file():
        raise ModelError(f"model {source} is not a file")
    try:
        if path.stat().st_size > MAX_MODEL_BYTES:
            raise ModelError(f"model {source} is larger than 2 GiB, which no single-file ONNX "
                             "model can be; pass the model.onnx written by `fxscore export`")
        data = path.read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read model {source}: {e.strerror or e}") from e
    # hashlib releases the GIL, so the file's hashes (model id, pin, digest) are computed on
    # other cores while onnxruntime builds the session.
    with ThreadPoolExecutor(max_workers=2) as pool:
        sha_future = pool.submit(sha256_bytes, data)
        digest_future, unreadable, claimed, meta_dict = None, None, pinned, None
        try:
            props = modelfile.read_props(data)
            if pinned is None:
                meta_dict = metadata_dict(props, f"model {source}")
                claimed = _claimed_digest(meta_dict)
        except ContractError as e:
            unreadable = e  # reported below, after the checks that come first
        # A cached optimised graph is looked up by the digest the file claims; the claim is
        # verified below (pin or digest) before the session is returned, or nothing is.
        entry = sessioncache.entry_path(claimed) if claimed and _cpu_only(providers) else None
        # The sha256 of the file the entry was made from, which passed this same digest check:
        # a file with that sha256 is that file, so its digest need not be computed again.
        known = sessioncache.verified_sha256(entry) if entry is not None else None
        if meta_dict is not None and known is None:  # version 1: fails at once, unread
            digest_future = pool.submit(modelfile.check_digest, data, meta_dict)
        tmp = None
        try:
            try:
                session, tmp = _session(data, source, providers, threads, entry)
            finally:  # a damaged default model is reported as such, whatever else fails
                sha256 = sha_future.result()
                if pinned is not None and sha256 != pinned:
                    raise ModelError(
                        f"{source}: its sha256 {sha256[:16]}... is not the {pinned[:16]}... "
                        "this fxscore release pins for its default model, so the installation "
                        "is damaged or was modified. Reinstall fxscore (pip install "
                        "--force-reinstall), or pass --model PATH")
            try:
                if unreadable is not None:
                    raise unreadable
                meta = ModelMeta.from_props(props, f"model {source}")
                if pinned is not None:  # the release's file byte for byte: a digest adds nothing
                    integrity = f"verified: sha256 {sha256[:16]}... pinned by this fxscore release"
                elif meta.format_version >= 2:
                    if digest_future is not None:
                        digest = digest_future.result()
                    elif sha256 == known:
                        digest = claimed
                    else:  # the same digest claimed by other bytes: check this file's own
                        digest = modelfile.check_digest(data, meta_dict)
                    integrity = f"verified: digest {digest[:23]}... matches"
                else:
                    integrity = ("unverified: format version 1 carries no digest (re-export it "
                                 "with this fxscore to add one)")
            except ContractError as e:
                message = str(e) if str(e).startswith("model ") else f"model {source}: {e}"
                raise ModelError(message) from e
            _check_graph(session, meta, source)
        except BaseException:
            sessioncache.discard(tmp)  # an optimised graph of a file that failed is not kept
            raise
    if tmp is not None:
        sessioncache.commit(tmp, entry, sha256)
    verified = integrity.startswith("verified")
    return Model(session=session, meta=meta, model_id=sha256[:12], path=path,
                 verified=verified, integrity=integrity, props=props)


def _claimed_digest(meta: dict) -> str | None:
    """The digest a format-2 file records for itself (checked later by the loader), else None."""
    try:
        version = int(meta.get("format_version", 1))
    except (TypeError, ValueError):
        return None
    digest = meta.get(DIGEST_KEY)
    return digest if version >= 2 and isinstance(digest, str) else None


def _cpu_only(providers: tuple[str, ...]) -> bool:
    return _provider_names(providers) == ["CPUExecutionProvider"]


def _session(data: bytes, source: str, providers: tuple[str, ...], threads: int | None,
             entry: Path | None = None) -> tuple[ort.InferenceSession, Path | None]:
    """The session, and the temporary directory its optimised graph was written into for the
    cache (None when it came from the cache, or the cache is off or not writable)."""
    names = _provider_names(providers)
    graph = sessioncache.graph_of(entry) if entry is not None else None
    if graph is not None:
        options = session_options(threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(str(graph), options, providers=names)
            sessioncache.used(entry)
            return session, None
        except Exception:  # noqa: BLE001 - a damaged or foreign entry: build from the file
            sessioncache.discard(entry)
    tmp = sessioncache.writable_tmp(entry) if entry is not None else None
    options = session_options(threads)
    if tmp is not None:
        sessioncache.save_into(options, tmp)
    try:
        session = ort.InferenceSession(data, options, providers=names)
    except Exception as e:  # onnxruntime raises its own exception types, all meaning "unusable"
        sessioncache.discard(tmp)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model {source} is not a valid ONNX model: {first}") from e
    if tmp is not None and sessioncache.graph_of(tmp) is None:
        sessioncache.discard(tmp)  # onnxruntime could not write it: no entry this time
        tmp = None
    if "CUDAExecutionProvider" in names and "CUDAExecutionProvider" not in session.get_providers():
        raise ModelError("onnxruntime could not start the CUDA provider (is the CUDA runtime "
                         "installed and a GPU visible?); use --provider cpu")
    return session, tmp


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """The onnxruntime settings every fxscore model is scored with."""
    options = ort.SessionOptions()
    # Explicit threads: onnxruntime's default is one per *host* core, which oversubscribes
    # containers and batch-system slots.
    options.intra_op_num_threads = threads or available_cpus()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Between batches the pool's threads would spin, holding CPUs the decoders need then
    # (fxscore.scoring decodes between batches where CPUs are short). Measured on 2 cores:
    # the bare model unchanged at batch 32 and about 1% slower at batch 1; a 224 px JPEG run
    # no faster beyond the noise, but with less CPU per image (with the reused batch array).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: warnings would interleave with our stderr
    return options


def _provider_names(providers: tuple[str, ...]) -> list[str]:
    names = [PROVIDERS.get(p.lower(), p) for p in providers]
    installed = ort.get_available_providers()
    for name in names:
        if name not in installed:
            hint = " (pip install onnxruntime-gpu)" if name == "CUDAExecutionProvider" else ""
            raise ModelError(f"onnxruntime provider {name} is not available in this "
                             f"installation{hint}; available: {', '.join(installed)}")
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")  # for any operator the accelerator lacks
    return names


def _check_graph(session: ort.InferenceSession, meta: ModelMeta, source: str) -> None:
    """The graph must take what the metadata promises: NCHW float32, 3 channels, dynamic batch."""
    h, w = meta.preprocess.input_size
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != meta.input_name:
        raise ModelError(f"model {source}: metadata names input '{meta.input_name}' but the graph "
                         f"takes {[i.name for i in inputs]}; re-export the model")
    inp = inputs[0]
    if inp.type != "tensor(float)":
        raise ModelError(f"model {source}: input is {inp.type}, an fxscore model takes float32")
    shape = list(inp.shape)
    if len(shape) != 4 or any(isinstance(d, int) and d != want
                              for d, want in zip(shape[1:], (3, h, w))):
        raise ModelError(f"model {source}: input shape {shape} disagrees with its metadata "
                         f"(expected [N, 3, {h}, {w}]); re-export the model")
    if isinstance(shape[0], int):
        raise ModelError(f"model {source}: batch size is fixed to {shape[0]}; export it with a "
                         "dynamic batch axis (fxscore export does)")
    from .graph_outputs import OutputsError, check_session_outputs

    try:
        check_session_outputs((o.name for o in session.get_outputs()), meta.outputs, source)
    except OutputsError as e:
        raise ModelError(str(e)) from None
    out = list(session.get_outputs()[0].shape)
    if len(out) not in (1, 2) or (len(out) == 2 and isinstance(out[1], int) and out[1] != 1):
        raise ModelError(f"model {source}: output shape {out} is not [N] or [N, 1] "
                         "(one probability per image)")

