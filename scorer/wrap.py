"""Bring a model to fxscore without torch: wrap a third-party ONNX classifier in the contract,
or write a copy of an fxscore model with a new threshold or version.

    spec = WrapSpec(class_names=("fractured", "not fractured"), positive_class="fractured",
                    input_size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                    output="softmax:1")
    report = wrap_onnx("monai.onnx", "fx.onnx", spec)
    report = rewrap("fx.onnx", "fx-t037.onnx", threshold=0.37)

The scorer feeds every model the same thing: float32 NCHW, 3 identical grey channels
normalised with the model's mean/std, one probability per image out. `wrap_onnx` fits a
classifier to that with a few operators in front of and behind its graph, built with
onnx.helper:

- NHWC input (Keras, TensorFlow): a Transpose in front.
- 1-channel input: the first channel is sliced off (mean and std are then one value, so the
  three channels are identical).
- Inputs in 0-255 units (`input_range=255`, mean/std given in those units): mean and std are
  stored divided by 255, which is the same arithmetic: (x - m/255) / (s/255) = (255 x - m) / s.
- A fixed batch size of 1: the batch axis is made dynamic, and refused if the graph cannot
  run a batch of several images.
- The output, as the user says it is (no guessing): `logit` (one value; a Sigmoid is added),
  `probability` (one value in [0, 1]), `softmax:INDEX` (class logits; Softmax added, column
  INDEX taken) or `probability:INDEX` (class probabilities; column INDEX taken).

Anything else (other input types or ranks, several inputs, a channel count other than 1 or 3)
is refused with a message naming the fix. Before the file is kept, the wrapped model is loaded
with the scorer's own loader (contract, digest, graph checks), and on a few generated images
(plus --check files) its probabilities must equal the original graph's outputs put through
the same sigmoid/softmax in numpy, within `TOLERANCE`, in one batch and image by image.
The file is written with `fxscore.modelfile.write_model` (contract format version 2 with a
digest), atomically.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__
from .contract import META_KEY, RESIZE_METHODS, ContractError, ModelMeta, Preprocess
from .hashing import sha256_bytes

TOLERANCE = 1e-5  # wrapped vs original probability; float32 sigmoid/softmax differ by ~1e-7
OUTPUT_KINDS = ("logit", "probability", "softmax:INDEX", "probability:INDEX")
LAYOUTS = ("nchw", "nhwc")
PREFIX = "fxscore_wrap/"  # names of the tensors and nodes wrap adds


class WrapError(ValueError):
    """The model cannot be wrapped as given; the message names the file and the fix."""


@dataclass(frozen=True)
class WrapSpec:
    """What the user says about a third-party classifier (nothing is guessed)."""

    class_names: tuple[str, str]
    positive_class: str
    input_size: tuple[int, int]  # (height, width) the graph is fed
    mean: tuple[float, ...]  # 1 value (1-channel models) or 3, in `input_range` units
    std: tuple[float, ...]
    output: str  # one of OUTPUT_KINDS, e.g. "softmax:1"
    layout: str = "nchw"
    input_range: float = 1.0  # 1: intensities in [0, 1]; 255: 0-255 units
    resize: str = "bilinear"
    threshold: float = 0.5
    model_name: str | None = None  # default: the source file's stem
    model_version: str = "1"
    output_name: str | None = None  # which graph output, when it has several


def parse_output(text: str) -> tuple[str, int | None]:
    """'logit' -> ('logit', None); 'softmax:1' -> ('softmax', 1); refuses anything else."""
    kind, _, index = text.strip().lower().partition(":")
    if kind in ("logit", "probability") and not index:
        return kind, None
    if kind in ("softmax", "probability") and index.strip().isdigit():
        return kind, int(index)
    raise WrapError(f"--output {text!r}: say what the model's output is: "
                    + ", ".join(OUTPUT_KINDS) + " (INDEX: the column of the positive class, "
                    "from 0)")


def is_fxscore_model(path: str | os.PathLike) -> bool:
    """Whether the file already carries fxscore metadata (read without onnx or onnxruntime)."""
    from .modelfile import read_props

    try:
        return META_KEY in read_props(Path(path).read_bytes())
    except (OSError, ContractError):
        return False


# ---------------------------------------------------------------------------- the graph

def _load_proto(path: Path):
    import onnx

    if not path.is_file():
        raise WrapError(f"{path} does not exist or is not a file; give the ONNX model to wrap")
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf and onnx raise several types for "not ONNX"
        raise WrapError(f"{path}: not a readable ONNX model ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from e
    return proto


def _dims(value_info) -> list[int | str | None]:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in t.shape.dim]


def _real_inputs(graph) -> list:
    initialised = {i.name for i in graph.initializer}
    return [i for i in graph.input if i.name not in initialised]


def _unique(graph, wanted: str) -> str:
    used = {n for node in graph.node for n in (*node.input, *node.output)}
    used |= {i.name for i in graph.input} | {o.name for o in graph.output}
    used |= {i.name for i in graph.initializer}
    name, k = wanted, 1
    while name in used:
        name, k = f"{wanted}_{k}", k + 1
    return name


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def inspect(proto, spec: WrapSpec, source: str) -> dict[str, Any]:
    """Check the graph's input and output against `spec`; return what adapting it needs."""
    import onnx

    graph = proto.graph
    inputs = _real_inputs(graph)
    if len(inputs) != 1:
        raise WrapError(f"{source}: the graph takes {len(inputs)} inputs "
                        f"({', '.join(i.name for i in inputs) or 'none'}); fxscore feeds one "
                        "image tensor. Export the classifier with a single image input")
    inp = inputs[0]
    elem = inp.type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        name = onnx.TensorProto.DataType.Name(elem)
        raise WrapError(f"{source}: input '{inp.name}' is {name}; fxscore feeds float32. "
                        "Export the model with a float32 input (for uint8 image inputs, "
                        "export the graph after the cast to float)")
    dims = _dims(inp)
    if len(dims) != 4:
        raise WrapError(f"{source}: input '{inp.name}' has shape {dims or 'unknown'}; fxscore "
                        "feeds 4-D image batches (N, C, H, W or N, H, W, C)")
    if spec.layout not in LAYOUTS:
        raise WrapError(f"--layout {spec.layout!r}: expected one of {', '.join(LAYOUTS)}")
    c_axis, hw_axes = (1, (2, 3)) if spec.layout == "nchw" else (3, (1, 2))
    channels = dims[c_axis]
    if channels not in (1, 3):
        other = dims[3] if spec.layout == "nchw" else dims[1]
        hint = (" (it looks like the other layout: try --layout "
                f"{'nhwc' if spec.layout == 'nchw' else 'nchw'})" if other in (1, 3) else "")
        raise WrapError(f"{source}: input '{inp.name}' {dims} read as {spec.layout.upper()} "
                        f"has {channels!r} channels; fxscore supports 1 (grey) or 3 (RGB) "
                        f"channels{hint}")
    for axis, want, what in zip(hw_axes, spec.input_size, ("height", "width")):
        if isinstance(dims[axis], int) and dims[axis] != want:
            raise WrapError(f"{source}: the graph's input {what} is fixed to {dims[axis]} but "
                            f"--input-size says {want}; give --input-size "
                            f"{dims[hw_axes[0]]},{dims[hw_axes[1]]}")
    if len(spec.mean) != len(spec.std) or len(spec.mean) not in (1, 3):
        raise WrapError(f"--mean and --std need 1 or 3 values each, got {len(spec.mean)} and "
                        f"{len(spec.std)}")
    if channels == 1 and len(spec.mean) != 1:
        raise WrapError(f"{source}: the model takes 1 channel, so --mean and --std are one "
                        f"value each (got {len(spec.mean)})")
    outputs = list(graph.output)
    if spec.output_name:
        chosen = [o for o in outputs if o.name == spec.output_name]
        if not chosen:
            raise WrapError(f"{source}: no graph output named '{spec.output_name}'; it has "
                            + ", ".join(o.name for o in outputs))
        out = chosen[0]
    elif len(outputs) == 1:
        out = outputs[0]
    else:
        raise WrapError(f"{source}: the graph has {len(outputs)} outputs ("
                        + ", ".join(o.name for o in outputs) + "); choose the class scores "
                        "with --output-name")
    kind, index = parse_output(spec.output)
    opset = _opset(proto)
    if opset < 7:
        raise WrapError(f"{source}: opset {opset} is older than fxscore handles (7); convert "
                        "it with onnx.version_converter")
    return {"input": inp.name, "input_dims": dims, "channels": channels, "output": out.name,
            "output_dims": _dims(out), "kind": kind, "index": index, "opset": opset,
            "fixed_batch": isinstance(dims[0], int)}


def _normalisation(spec: WrapSpec) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The contract's mean/std (intensities in [0, 1], three channels) for the user's values."""
    scale = float(spec.input_range)
    if scale not in (1.0, 255.0):
        raise WrapError(f"--input-range {spec.input_range:g}: expected 1 (intensities in "
                        "[0, 1]) or 255 (0-255 units)")
    mean = [float(v) / scale for v in spec.mean]
    std = [float(v) / scale for v in spec.std]
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    return tuple(mean), tuple(std)  # type: ignore[return-value]


def adapt_graph(proto, facts: dict[str, Any], spec: WrapSpec):
    """A copy of `proto` taking fxscore's input and returning [N, 1] positive-class
    probabilities; also the list of adaptations made, in words."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.ModelProto.FromString(proto.SerializeToString())  # a deep copy
    g = proto.graph
    notes: list[str] = []
    h, w = spec.input_size
    old_in, opset = facts["input"], facts["opset"]
    batch = "N"
    nodes_in: list = []
    adapted = facts["channels"] == 1 or spec.layout == "nhwc"
    new_in = _unique(g, "input") if adapted else old_in
    current = new_in
    if facts["channels"] == 1:
        sliced = PREFIX + "grey"
        if opset >= 10:
            consts = [helper.make_tensor(PREFIX + n, TensorProto.INT64, [1], [v])
                      for n, v in (("start", 0), ("end", 1), ("axis", 1))]
            g.initializer.extend(consts)
            nodes_in.append(helper.make_node("Slice", [current, *(c.name for c in consts)],
                                             [sliced], name=PREFIX + "slice"))
        else:
            nodes_in.append(helper.make_node("Slice", [current], [sliced], name=PREFIX + "slice",
                                             starts=[0], ends=[1], axes=[1]))
        current = sliced
        notes.append("1-channel input: the first of fxscore's three identical grey channels "
                     "is fed")
    if spec.layout == "nhwc":
        transposed = PREFIX + "nhwc"
        nodes_in.append(helper.make_node("Transpose", [current], [transposed], perm=[0, 2, 3, 1],
                                         name=PREFIX + "to_nhwc"))
        current = transposed
        notes.append("NHWC input: a Transpose from fxscore's NCHW is added in front")
    if adapted:
        for node in g.node:  # the old input is now made by the adaptation nodes
            node.input[:] = [current if n == old_in else n for n in node.input]
        for o in g.output:
            if o.name == old_in:
                raise WrapError("the graph returns its input unchanged; nothing to wrap")
    if spec.input_range == 255:
        notes.append("mean/std given in 0-255 units are stored divided by 255 (the same "
                     "arithmetic on intensities in [0, 1])")
    if facts["fixed_batch"]:
        notes.append(f"batch size fixed to {facts['input_dims'][0]}: made dynamic")

    # fxscore's input: float32 [N, 3, H, W]
    kept_inputs = [i for i in g.input if i.name != old_in and i.name not in
                   {t.name for t in g.initializer}]
    del g.input[:]
    g.input.extend([helper.make_tensor_value_info(new_in, TensorProto.FLOAT, [batch, 3, h, w]),
                    *kept_inputs])
    body = list(g.node)
    del g.node[:]
    g.node.extend([*nodes_in, *body])  # topological order: the adaptation first

    # the output: [N, K] -> [N, 1] probability of the positive class
    kind, index = facts["kind"], facts["index"]
    flat = PREFIX + "scores"
    nodes_out = [helper.make_node("Flatten", [facts["output"]], [flat], axis=1,
                                  name=PREFIX + "flatten")]
    prob = _unique(g, "probability")
    if kind == "logit":
        nodes_out.append(helper.make_node("Sigmoid", [flat], [prob], name=PREFIX + "sigmoid"))
        notes.append("output is a logit: a Sigmoid is added")
    elif kind == "probability" and index is None:
        nodes_out.append(helper.make_node("Identity", [flat], [prob], name=PREFIX + "identity"))
    else:
        scores = flat
        if kind == "softmax":
            scores = PREFIX + "softmax"
            nodes_out.append(helper.make_node("Softmax", [flat], [scores], axis=1,
                                              name=PREFIX + "softmax"))
        idx = helper.make_tensor(PREFIX + "index", TensorProto.INT64, [1], [index])
        g.initializer.append(idx)
        nodes_out.append(helper.make_node("Gather", [scores, idx.name], [prob], axis=1,
                                          name=PREFIX + "column"))
        notes.append(("output is class logits: Softmax added, " if kind == "softmax"
                      else "output is class probabilities: ") + f"column {index} taken")
    g.node.extend(nodes_out)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(prob, TensorProto.FLOAT, [batch, 1]))
    # Shapes recorded inside the graph may pin the old batch size or layout: drop them, they
    # are optional and onnxruntime infers its own.
    del g.value_info[:]
    if proto.ir_version < 4:  # from IR 4 on, initializers need not be listed as inputs
        proto.ir_version = 4
    return proto, notes


# ---------------------------------------------------------------------------- checking

def sample_images(input_size: tuple[int, int], n: int = 4, seed: int = 0) -> list[np.ndarray]:
    """A few generated intensity images in [0, 1] (flat, gradient, noise, bright bar) at twice
    the input size, so preprocessing resizes them as it does real X-rays."""
    h, w = (2 * s for s in input_size)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bar = np.full((h, w), 0.15, np.float32)
    bar[:, w // 3: w // 2] = 0.9
    images = [np.full((h, w), 0.5, np.float32), (xx + yy) / (h + w - 2),
              rng.random((h, w), dtype=np.float32), bar]
    return [im.astype(np.float32) for im in images[:n]]


def _reference(session, facts: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """The original graph on fxscore's batch x, adapted in numpy, then sigmoid/softmax."""
    z = x[:, :1] if facts["channels"] == 1 else x
    if facts["input_dims"] and len(facts["input_dims"]) == 4 and facts.get("layout") == "nhwc":
        z = z.transpose(0, 2, 3, 1)
    z = np.ascontiguousarray(z, dtype=np.float32)
    if facts["fixed_batch"]:
        outs = [session.run([facts["output"]], {facts["input"]: z[i:i + 1]})[0]
                for i in range(len(z))]
        out = np.concatenate([np.asarray(o).reshape(1, -1) for o in outs])
    else:
        out = np.asarray(session.run([facts["output"]], {facts["input"]: z})[0])
    out = out.reshape(len(x), -1).astype(np.float64)
    kind, index = facts["kind"], facts["index"]
    k = out.shape[1]
    if index is None and k != 1:
        raise WrapError(f"the output '{facts['output']}' has {k} values per image; for class "
                        f"scores say which column is '{facts['positive']}': --output "
                        f"softmax:INDEX (logits) or probability:INDEX (probabilities)")
    if index is not None and not 0 <= index < k:
        raise WrapError(f"--output {kind}:{index}: the output '{facts['output']}' has only {k} "
                        f"column(s) (0..{k - 1})")
    if index is not None and k < 2:
        raise WrapError(f"--output {kind}:{index}: the output has one value per image; use "
                        "--output logit or --output probability")
    if not np.all(np.isfinite(out)):
        raise WrapError("the original graph returns NaN or infinite values on the test images; "
                        "check its preprocessing (--mean, --std, --input-range) and weights")
    if kind == "logit":
        return 1.0 / (1.0 + np.exp(-out[:, 0]))
    if kind == "probability":
        p = out[:, 0] if index is None else out[:, index]
        if np.any(p < 0) or np.any(p > 1):
            bad = float(p[(p < 0) | (p > 1)][0])
            raise WrapError(f"--output {facts['spec_output']}: the output holds {bad:g}, not a "
                            "probability in [0, 1]; it is a logit (use --output logit, or "
                            "softmax:INDEX for class logits)")
        return p
    e = np.exp(out - out.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True))[:, index]


def _check_batches(x: np.ndarray, original, facts, wrapped) -> dict[str, Any]:
    want = _reference(original, facts, x)
    together = wrapped.predict(x).astype(np.float64)
    alone = np.array([wrapped.predict(x[i:i + 1])[0] for i in range(len(x))], np.float64)
    worst = float(max(np.abs(together - want).max(), np.abs(alone - want).max()))
    if worst > TOLERANCE:
        raise WrapError(f"the wrapped model differs from the original by {worst:.2g} in "
                        f"probability (allowed {TOLERANCE:g}), so the adaptation is wrong for "
                        "this graph; no file written")
    return {"images": len(x), "max_abs_prob": worst,
            "probabilities": [round(float(p), 6) for p in together]}


def _session(data: bytes, source: str):
    import onnxruntime as ort

    from .model import session_options

    try:
        return ort.InferenceSession(data, session_options(1), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WrapError(f"{source}: onnxruntime cannot run it: {first}") from e


# ---------------------------------------------------------------------------- writing

def _staged_write(data: bytes, meta: ModelMeta, out: Path):
    """Write with fxscore.modelfile to a hidden temporary beside `out`; return its path."""
    from .modelfile import write_model

    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise WrapError(f"--out {out}: name the model file *.onnx")
    if not out.parent.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".wrap.onnx", dir=out.parent)
    os.close(fd)
    try:
        write_model(data, meta, tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _publish(tmp: Path, out: Path) -> None:
    os.replace(tmp, out)


def _meta(spec: WrapSpec, input_name: str, training: dict[str, Any], source: Path) -> ModelMeta:
    mean, std = _normalisation(spec)
    if spec.positive_class not in spec.class_names:
        raise WrapError(f"--positive {spec.positive_class!r} is not one of --classes "
                        f"{', '.join(spec.class_names)}")
    if spec.resize not in RESIZE_METHODS:
        raise WrapError(f"--resize {spec.resize!r}: expected one of {', '.join(RESIZE_METHODS)}")
    try:
        meta = ModelMeta(class_names=tuple(spec.class_names), positive_class=spec.positive_class,
                         preprocess=Preprocess(input_size=tuple(spec.input_size), mean=mean,
                                               std=std, resize=spec.resize),
                         threshold=float(spec.threshold),
                         model_name=spec.model_name or source.stem,
                         model_version=spec.model_version, input_name=input_name,
                         training=training)
        ModelMeta.from_dict(meta.to_dict())  # the scorer's validator, before anything is built
    except (ContractError, TypeError, ValueError) as e:
        raise WrapError(f"the options do not make a valid fxscore model: {e}") from e
    return meta


def wrap_onnx(source: str | os.PathLike, out: str | os.PathLike, spec: WrapSpec, *,
              check_images: Sequence[Path] = ()) -> dict[str, Any]:
    """Wrap a third-party ONNX classifier; write `out` only when every check passed.

    Returns the report: what was adapted, the parity check, the written model's id.
    """
    from .images import ImageReadError, read_image
    from .model import ModelError, load_model
    from .preprocess import preprocess

    source, out = Path(source), Path(out)
    proto = _load_proto(source)
    if any(p.key == META_KEY for p in proto.metadata_props):
        raise WrapError(f"{source} is already an fxscore model; to change its threshold, "
                        "version or name: fxscore wrap MODEL --out NEW.onnx --threshold T "
                        "(without --classes, --input-size, ...)")
    facts = inspect(proto, spec, str(source))
    facts.update(layout=spec.layout, positive=spec.positive_class, spec_output=spec.output)
    raw = source.read_bytes()
    kind, index = facts["kind"], facts["index"]
    training = {"wrapped": {
        "source": source.name, "source_sha256": sha256_bytes(raw),
        "output": spec.output, "layout": spec.layout, "channels": facts["channels"],
        "input_range": spec.input_range, "user_mean": list(spec.mean),
        "user_std": list(spec.std), "fxscore": __version__}}
    meta = _meta(spec, "input", training, source)  # input name fixed below

    params = meta.preprocess
    images = sample_images(spec.input_size)
    used = ["generated"] * len(images)
    for f in check_images:
        try:
            images.append(read_image(f))
            used.append(str(f))
        except ImageReadError as e:
            raise WrapError(f"--check: {e}") from e
    x = np.stack([preprocess(im, params) for im in images])
    original = _session(proto.SerializeToString(), str(source))
    _reference(original, facts, x)  # the output's kind and column make sense, before building

    adapted, notes = adapt_graph(proto, facts, spec)
    training["wrapped"]["adaptations"] = notes
    meta = dataclasses.replace(meta, input_name=adapted.graph.input[0].name, training=training)
    tmp = _staged_write(adapted.SerializeToString(), meta, out)
    try:
        try:
            wrapped = load_model(tmp, threads=1)
        except ModelError as e:
            raise WrapError(f"the wrapped model fails the scorer's loader: {e}") from e
        try:
            check = _check_batches(x, original, facts, wrapped)
        except ModelError as e:
            raise WrapError(f"the wrapped model does not return probabilities: {e}") from e
        except Exception as e:  # noqa: BLE001 - onnxruntime errors, e.g. a graph pinned to batch 1
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WrapError(f"{source}: the graph cannot score a batch of {len(x)} images after "
                            f"wrapping ({first}); export it with a dynamic batch axis") from e
        _publish(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    check["sources"] = used
    return {"source": str(source), "model": str(out), "model_id": sha256_bytes(
        out.read_bytes())[:12], "adaptations": notes, "check": check,
        "input": {"name": meta.input_name, "layout": spec.layout,
                  "channels": facts["channels"]},
        "metadata": meta.to_dict()}


def rewrap(source: str | os.PathLike, out: str | os.PathLike, *, threshold: float | None = None,
           model_version: str | None = None, model_name: str | None = None) -> dict[str, Any]:
    """A copy of an fxscore model with a new threshold, version and/or name, digest updated.

    The source is loaded with the scorer's loader first (a damaged or hand-edited version-2
    file is refused); weights and graph are copied byte for byte.
    """
    from .model import ModelError, load_model
    from .preprocess import preprocess

    source, out = Path(source), Path(out)
    if threshold is None and model_version is None and model_name is None:
        raise WrapError(f"{source} is already an fxscore model: say what to change "
                        "(--threshold, --model-version, --model-name)")
    if threshold is not None and not (isinstance(threshold, (int, float))
                                      and math.isfinite(threshold) and 0 <= threshold <= 1):
        raise WrapError(f"--threshold must be a number in [0, 1], got {threshold!r}")
    try:
        model = load_model(source, threads=1)
    except ModelError as e:
        raise WrapError(str(e)) from e
    if out.resolve() == source.resolve():
        raise WrapError(f"--out {out} is the source model; write the copy to another file")
    old = model.meta
    changes = {k: [getattr(old, k), v] for k, v in (("threshold", threshold),
                                                    ("model_version", model_version),
                                                    ("model_name", model_name))
               if v is not None and v != getattr(old, k)}
    training = dict(old.training)
    training["derived_from"] = {"model_id": model.model_id, "integrity": model.integrity,
                                "changes": changes, "fxscore": __version__}
    meta = dataclasses.replace(old, threshold=float(threshold) if threshold is not None
                               else old.threshold,
                               model_version=model_version or old.model_version,
                               model_name=model_name or old.model_name, training=training)
    try:
        ModelMeta.from_dict(meta.to_dict())
    except ContractError as e:
        raise WrapError(f"the new metadata is not valid: {e}") from e
    tmp = _staged_write(source.read_bytes(), meta, out)
    try:
        try:
            copy = load_model(tmp, threads=1)
        except ModelError as e:
            raise WrapError(f"the copy fails the scorer's loader: {e}") from e
        x = np.stack([preprocess(im, meta.preprocess)
                      for im in sample_images(meta.preprocess.input_size, 2)])
        same = np.array_equal(copy.predict(x), model.predict(x))
        if not same:
            raise WrapError("the copy scores differently from the source; no file written")
        _publish(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"source": str(source), "model": str(out),
            "model_id": sha256_bytes(out.read_bytes())[:12], "changes": changes,
            "source_integrity": model.integrity, "metadata": meta.to_dict()}
