"""Loading an fxscore ONNX model into onnxruntime, with everything checked before any file is read.

A model that is missing, is not ONNX, carries no fxscore metadata, or whose graph disagrees with
its metadata fails here with a `ModelError` naming the file and the fix, not halfway through a
night's batch job.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .contract import ContractError, ModelMeta
from .fingerprint import sha256_file

MODEL_ENV = "FXSCORE_MODEL"
DEFAULT_MODEL = "default.onnx"  # inside the fxscore.models package
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ModelError(Exception):
    """A model file cannot be used for scoring; the message names the file and the fix."""


@dataclass(frozen=True, eq=False)
class Model:
    session: ort.InferenceSession
    meta: ModelMeta
    model_id: str  # first 12 hex digits of the file's sha256: ties every output row to a model
    path: Path

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """NCHW float32 batch -> probability of the positive class, shape [N]."""
        out = self.session.run(None, {self.meta.input_name: batch})[0]
        out = np.asarray(out, dtype=np.float32)
        if out.size != len(batch):
            raise ModelError(f"{self.path}: model returned shape {out.shape} for a batch of "
                             f"{len(batch)}; an fxscore model returns one probability per image")
        return out.reshape(len(batch))

    def label(self, probability: float) -> str:
        meta = self.meta
        return meta.positive_class if probability >= meta.threshold else meta.negative_class


def available_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota.

    os.cpu_count() reports the host's cores; in a container limited to 2 CPUs on a 64-core node,
    64 onnxruntime threads would fight over 2 CPUs and run several times slower.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"),
                     self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup; None if unlimited or unknown.

    cgroup v2: `cpu.max` of this process's cgroup and of every ancestor (a container sees its
    own cgroup at the root; a batch job on a host sits deeper). cgroup v1: the cfs files.
    """
    quotas = []
    try:
        rel = next((line.split("::", 1)[1].strip() for line in self_cgroup.read_text().splitlines()
                    if line.startswith("0::")), "/")
    except OSError:
        rel = "/"
    folder = root / rel.lstrip("/")
    for f in [folder, *folder.parents]:
        try:
            quota, period = (f / "cpu.max").read_text().split()[:2]
            if quota != "max":
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError):
            pass
        if f == root:
            break
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            quotas.append(quota / period)
    except (OSError, ValueError):
        pass
    return min(quotas, default=None)


def load_model(path: str | Path | None = None, *, providers: tuple[str, ...] = ("cpu",),
               threads: int | None = None) -> Model:
    """Open an fxscore ONNX model: `path`, else $FXSCORE_MODEL, else the packaged default model.

    `providers` are short names ("cpu", "cuda") or onnxruntime provider names; `threads` is the
    intra-op thread count (default: `available_cpus()`).
    """
    if path is None and os.environ.get(MODEL_ENV):
        path = os.environ[MODEL_ENV]
        source = f"{MODEL_ENV}={path}"
    else:
        source = str(path)
    if path is not None:
        return _load(Path(path), source, providers, threads)
    packaged = resources.files("fxscore.models") / DEFAULT_MODEL
    if not packaged.is_file():
        raise ModelError(f"no model given and this fxscore has no packaged default model: pass "
                         f"--model PATH (an ONNX file made by `fxscore export`) or set {MODEL_ENV}")
    with resources.as_file(packaged) as p:
        return _load(Path(p), f"packaged default model {p}", providers, threads)


def _load(path: Path, source: str, providers: tuple[str, ...], threads: int | None) -> Model:
    if not path.exists():
        raise ModelError(f"model {source} does not exist; pass --model PATH to an ONNX file "
                         "made by `fxscore export`")
    if not path.is_file():
        raise ModelError(f"model {source} is not a file")
    try:
        model_id = sha256_file(path)[:12]
    except OSError as e:
        raise ModelError(f"cannot read model {source}: {e.strerror or e}") from e

    names = _provider_names(providers)
    try:
        session = ort.InferenceSession(str(path), session_options(threads), providers=names)
    except Exception as e:  # onnxruntime raises its own exception types, all meaning "unusable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model {source} is not a valid ONNX model: {first}") from e
    if "CUDAExecutionProvider" in names and "CUDAExecutionProvider" not in session.get_providers():
        raise ModelError("onnxruntime could not start the CUDA provider (is the CUDA runtime "
                         "installed and a GPU visible?); use --provider cpu")

    try:
        meta = ModelMeta.from_props(session.get_modelmeta().custom_metadata_map, source)
    except ContractError as e:
        raise ModelError(str(e)) from e
    _check_graph(session, meta, source)
    return Model(session=session, meta=meta, model_id=model_id, path=path)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """The onnxruntime settings every fxscore model is scored with."""
    options = ort.SessionOptions()
    # Explicit threads: onnxruntime's default is one per *host* core, which oversubscribes
    # containers and batch-system slots.
    options.intra_op_num_threads = threads or available_cpus()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
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
    out = list(session.get_outputs()[0].shape)
    if len(out) not in (1, 2) or (len(out) == 2 and isinstance(out[1], int) and out[1] != 1):
        raise ModelError(f"model {source}: output shape {out} is not [N] or [N, 1] "
                         "(one probability per image)")

