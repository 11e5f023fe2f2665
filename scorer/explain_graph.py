"""Graph surgery without PyTorch: give an fxscore model the outputs heatmaps and the OOD flag need.

    data, meta = augment(model_bytes, meta)                   # + feature_map, pooled outputs
    data, meta = augment(model_bytes, meta, ood=stats)        # + ood_score (fxscore.ood)

An fxscore graph ends in global average pooling, one linear layer and a sigmoid:

    ... -> feature map [N, K, h, w] -> GlobalAveragePool / ReduceMean(2, 3) -> (Reshape,
    Flatten) -> pooled [N, K] -> Gemm / MatMul (+ Add) -> logit -> (Squeeze) -> Sigmoid

`find_head` walks back from the probability output to find the last feature map, the pooled
features and the head's weights and bias (initializers, or DequantizeLinear of initializers in
a graph whose head was quantised), stepping over QuantizeLinear/DequantizeLinear pairs, so it
works on fp32 graphs and int8 QDQ graphs alike. `augment` adds the two tensors as named graph
outputs (through Identity nodes, so the names are fixed whatever the exporter called them),
stores the head in the contract (`cam`: weights, bias, cell grid), on a ResNet-like graph adds
`ood_features` (`find_stages`, `add_ood_features`: per-channel spatial mean and std of the
stem, the second stage and the feature map, what OOD statistics are fit on) and, given OOD
statistics, adds the Mahalanobis distance of the features they were fit on (`ood_features`,
or `pooled` for statistics with `feature: "pooled"`) as an output:

    ood_score = sqrt(sum(((features - mean) @ W) ** 2, axis=1)),  W = V diag(1/sqrt(lambda))

with V, lambda the eigenvectors and eigenvalues of the shrunk covariance; mean and W are graph
initializers, covered by the model's digest like every weight. Nothing in front of the pooling
changes, so the probability is bit-identical to the source model's (tested), and the int8
cross-CPU rule (exact integer kernels, float head) covers the feature map and the stage
tensors too: each is the dequantised output of an integer block, as the next layer reads it.

Needs the `onnx` package (a core dependency, torch-free); imported only here, not on the
scoring path.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .contract import ModelMeta
from .graph_outputs import (FEATURE_MAP, OOD_FEATURES, OOD_SCORE, POOLED, PROBABILITY,
                            STATS_FEATURE)

if TYPE_CHECKING:
    import os
    from pathlib import Path

    import onnx

    from .ood import OodStats

PREFIX = "fxscore_explain/"  # names of the nodes and initializers added here
POOL_OPS = ("GlobalAveragePool", "ReduceMean")
SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
LINEAR_OPS = ("Gemm", "MatMul")


class ExplainGraphError(ValueError):
    """The graph is not shaped like an fxscore CNN (pooling -> one linear layer -> sigmoid)."""


@dataclass(frozen=True)
class Head:
    """What `find_head` found: tensor names in the graph and the head's parameters."""

    probability: str  # the graph output
    feature_map: str  # input of the global pooling: [N, K, h, w]
    pooled: str  # float pooled features, [N, K] (None-shaped GAP output gets a Flatten)
    pooled_needs_flatten: bool  # the pooled tensor is [N, K, 1, 1]
    weights: np.ndarray  # float64 [K]: logit = weights . pooled + bias
    bias: float


def _attr(node, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Graph:
    """Producers, constants and helpers over a GraphProto."""

    def __init__(self, graph) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.init = {i.name: i for i in graph.initializer}
        self._np = numpy_helper

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer, Constant node, or DequantizeLinear of
        constants), else None."""
        if name in self.init:
            return self._np.to_array(self.init[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            value = _attr(node, "value")
            return None if value is None else self._np.to_array(value)
        if node.op_type == "DequantizeLinear":
            parts = [self.constant(i) if i else None for i in node.input]
            if parts[0] is None or parts[1] is None:
                return None
            q = parts[0].astype(np.float64)
            scale = parts[1].astype(np.float64)
            zero = (parts[2].astype(np.float64) if len(parts) > 2 and parts[2] is not None
                    else np.zeros_like(scale))
            if scale.ndim == 1 and q.ndim > 1:  # per-axis
                axis = _attr(node, "axis", 1) % q.ndim
                shape = [1] * q.ndim
                shape[axis] = -1
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            return (q - zero) * scale
        return None

    def data_input(self, node) -> str | None:
        """The one non-constant input of a node (its data path), or None."""
        data = [i for i in node.input if i and self.constant(i) is None]
        return data[0] if len(data) == 1 else None

    def step_back(self, name: str, ops: tuple[str, ...]) -> str:
        """Follow producers of type `ops` back from tensor `name`; return where that stops."""
        for _ in range(len(self.graph.node)):
            node = self.producer.get(name)
            if node is None or node.op_type not in ops:
                return name
            prev = self.data_input(node)
            if prev is None:
                return name
            name = prev
        return name


def _fail(why: str) -> ExplainGraphError:
    return ExplainGraphError(
        f"{why}. Heatmaps and the OOD flag need an fxscore CNN head: global average pooling, "
        "one linear layer with a single logit, and a sigmoid (what `fxscore export` writes); "
        "this graph cannot get them")


def find_head(proto: "onnx.ModelProto") -> Head:
    """Locate feature map, pooled features and the linear head; raise ExplainGraphError."""
    g = _Graph(proto.graph)
    if not proto.graph.output:
        raise _fail("the graph has no outputs")
    probability = proto.graph.output[0].name
    # output <- (QDQ, shape ops) <- Sigmoid
    t = g.step_back(probability, QDQ_OPS + SHAPE_OPS)
    node = g.producer.get(t)
    if node is None or node.op_type != "Sigmoid":
        raise _fail(f"the output '{probability}' does not come from a Sigmoid")
    # Sigmoid <- (QDQ, shape ops, a bias Add) <- Gemm / MatMul
    t = g.data_input(node)
    bias_add = None
    for _ in range(len(proto.graph.node)):
        t = g.step_back(t, QDQ_OPS + SHAPE_OPS)
        node = g.producer.get(t)
        if node is not None and node.op_type == "Add" and bias_add is None:
            bias_add = node
            t = g.data_input(node)
            if t is None:
                raise _fail("the Add in the head has no single data input")
            continue
        break
    if node is None or node.op_type not in LINEAR_OPS:
        raise _fail(f"no Gemm/MatMul in front of the sigmoid (found "
                    f"{node.op_type if node is not None else 'a graph input'})")
    weights, bias = _linear(g, node, bias_add)
    x = node.input[0]
    if g.constant(x) is not None:
        raise _fail("the linear layer's first input is a constant")
    # Gemm input <- (QDQ) <- pooled: the float tensor the pooling side produced
    pooled = g.step_back(x, QDQ_OPS)
    t = g.step_back(pooled, SHAPE_OPS + QDQ_OPS)
    pool = g.producer.get(t)
    if pool is None or pool.op_type not in POOL_OPS:
        raise _fail(f"no global average pooling in front of the linear layer (found "
                    f"{pool.op_type if pool is not None else 'a graph input'})")
    if pool.op_type == "ReduceMean":
        _check_reduce_mean(g, pool)
    feature_map = pool.input[0]
    needs_flatten = False
    if pooled == t:  # the pooling output feeds the head directly
        keep = pool.op_type == "GlobalAveragePool" or _attr(pool, "keepdims", 1) == 1
        needs_flatten = bool(keep)
    return Head(probability=probability, feature_map=feature_map, pooled=pooled,
                pooled_needs_flatten=needs_flatten, weights=weights, bias=bias)


def _check_reduce_mean(g: _Graph, node) -> None:
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = g.constant(node.input[1])
        axes = None if value is None else [int(a) for a in np.ravel(value)]
    if axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
        raise _fail(f"the ReduceMean in front of the head reduces axes {axes}, not the two "
                    "spatial axes of an NCHW feature map")


def _linear(g: _Graph, node, bias_add) -> tuple[np.ndarray, float]:
    """(weights [K], bias) of a single-logit Gemm, or MatMul + Add."""
    w = g.constant(node.input[1]) if len(node.input) > 1 else None
    if w is None:
        raise _fail(f"the {node.op_type}'s weights are not constants")
    w = np.asarray(w, dtype=np.float64)
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            raise _fail("the Gemm transposes its input (transA)")
        if _attr(node, "transB", 0):
            w = w.T
        w = w * float(_attr(node, "alpha", 1.0))
        c = g.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and c is None:
            raise _fail("the Gemm's bias is not a constant")
        bias = 0.0 if c is None else float(np.ravel(c)[0]) * float(_attr(node, "beta", 1.0))
        if c is not None and np.size(c) != 1:
            raise _fail(f"the Gemm's bias has {np.size(c)} values, not one")
    else:
        bias = 0.0
    if w.ndim != 2 or w.shape[1] != 1:
        raise _fail(f"the linear layer maps to {w.shape[1] if w.ndim == 2 else w.shape} "
                    "values, not one logit")
    if bias_add is not None:
        c = [g.constant(i) for i in bias_add.input]
        c = [v for v in c if v is not None]
        if len(c) != 1 or np.size(c[0]) != 1:
            raise _fail("the Add after the linear layer is not a single bias value")
        bias += float(np.ravel(c[0])[0])
    return w[:, 0].copy(), bias


def _unique(taken: set[str], name: str) -> str:
    out, i = name, 1
    while out in taken:
        i += 1
        out = f"{name}_{i}"
    taken.add(out)
    return out


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _inferred_shapes(proto) -> dict[str, list[Any]]:
    """tensor -> shape from onnx's shape inference, dims as int or str (or None if unknown)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - shape inference is a nicety here
        return {}
    g = inferred.graph
    return {vi.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in vi.type.tensor_type.shape.dim]
            for vi in [*g.input, *g.output, *g.value_info]
            if vi.type.tensor_type.HasField("shape")}


def _inferred_shape(proto, tensor: str) -> list[Any] | None:
    """The tensor's shape from onnx's shape inference, dims as int or str; None if unknown."""
    return _inferred_shapes(proto).get(tensor)


# ---------------------------------------------------------------------------- OOD features

# Ops a block's output passes through before the next layer reads it: the ReLU after a
# residual Add (fp32 graphs) or the QuantizeLinear/DequantizeLinear pair an int8 QDQ graph
# has there instead (uint8, zero point 0: the ReLU is the quantisation's clip).
READ_THROUGH = ("Relu",) + QDQ_OPS


@dataclass(frozen=True)
class Stages:
    """The tensors the OOD statistics read (`find_stages`), as the next layer reads them."""

    stem: str  # the first MaxPool's output
    stage2: str  # the last residual join of the second resolution stage
    final: str  # the feature map in front of the global pooling
    channels: tuple[int, int, int]

    @property
    def tensors(self) -> tuple[str, str, str]:
        return self.stem, self.stage2, self.final

    @property
    def dim(self) -> int:
        return 2 * sum(self.channels)  # a mean and a std per channel


def _read_tensor(graph, name: str) -> str:
    """Follow `name` forward while its only consumer is a ReLU or a Q/DQ node: the tensor
    the next layer reads (what the int8 kernels compute exactly)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for _ in range(len(graph.node)):
        nodes = consumers.get(name, [])
        if len(nodes) != 1 or nodes[0].op_type not in READ_THROUGH:
            return name
        name = nodes[0].output[0]
    return name


def find_stages(proto: "onnx.ModelProto", head: Head) -> Stages | None:
    """The stem, middle stage and final feature map of a ResNet-like graph, or None.

    Rule: the stem is the first MaxPool's output; the residual joins (Adds of two computed
    tensors) after it are grouped into stages by spatial size, in graph order; the graph
    qualifies when there are at least three stages and the last join is the feature map the
    head pools. "stage2" is then the last join of the second stage (ResNet18: `max_pool2d`,
    `relu_8`, `relu_16`). Any other graph gets None: its OOD statistics read the pooled
    features alone, as before.
    """
    g = _Graph(proto.graph)
    nodes = [n for n in proto.graph.node if not n.name.startswith(PREFIX)]
    pools = [i for i, n in enumerate(nodes) if n.op_type == "MaxPool"]
    if not pools:
        return None
    shapes = _inferred_shapes(proto)
    stem = _read_tensor(proto.graph, nodes[pools[0]].output[0])
    joins = [_read_tensor(proto.graph, n.output[0]) for n in nodes[pools[0]:]
             if n.op_type == "Add" and len(n.input) == 2
             and all(g.constant(i) is None for i in n.input)]
    stages: list[list[str]] = []
    for t in joins:
        shape = shapes.get(t)
        if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
            return None
        if stages and shapes[stages[-1][-1]][2:] == shape[2:]:
            stages[-1].append(t)
        else:
            stages.append([t])
    if len(stages) < 3 or stages[-1][-1] != head.feature_map:
        return None
    tensors = (stem, stages[1][-1], head.feature_map)
    channels = [shapes.get(t, [None] * 4)[1] if len(shapes.get(t, [])) == 4 else None
                for t in tensors]
    if not all(isinstance(c, int) and c > 0 for c in channels):
        return None
    return Stages(*tensors, channels=tuple(channels))  # type: ignore[arg-type]


def add_ood_features(proto: "onnx.ModelProto", head: Head) -> tuple[str, int] | None:
    """Add `ood_features` (per-channel spatial mean and std of `find_stages`' tensors,
    concatenated: [N, 2 (c_stem + c_stage2 + c_final)]) to `proto` in place (idempotent).

    std = sqrt(max(E[x^2] - E[x]^2, 0)) (population std over H x W; the max guards the
    rounding of a constant channel). Returns (output name, dim), or None for a graph without
    that structure.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    stages = find_stages(proto, head)
    if stages is None:
        return None
    if any(o.name == OOD_FEATURES for o in graph.output) and any(
            n.name.startswith(PREFIX + "stats_") for n in graph.node):
        return OOD_FEATURES, stages.dim  # added before
    taken = {t for n in graph.node for t in (*n.input, *n.output)} | {
        o.name for o in graph.output} | {i.name for i in graph.initializer} | {
        i.name for i in graph.input}

    def name(key: str) -> str:
        return _unique(taken, PREFIX + "stats_" + key)

    reduce_in: list[str] = []
    reduce_kw: dict[str, Any] = {"keepdims": 0}
    if _opset(proto) >= 18:  # ReduceMean takes its axes as an input from opset 18 on
        axes = name("axes")
        graph.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), axes))
        reduce_in.append(axes)
    else:
        reduce_kw["axes"] = [2, 3]
    parts: list[str] = []
    for label, t in zip(("stem", "stage2", "final"), stages.tensors):
        mean, sq, mean_sq, sq_mean, var, pos, std = (name(f"{label}_{k}") for k in (
            "mean", "sq", "mean_sq", "sq_mean", "var", "var_pos", "std"))
        graph.node.extend([
            helper.make_node("ReduceMean", [t, *reduce_in], [mean], name=mean, **reduce_kw),
            helper.make_node("Mul", [t, t], [sq], name=sq),
            helper.make_node("ReduceMean", [sq, *reduce_in], [mean_sq], name=mean_sq,
                             **reduce_kw),
            helper.make_node("Mul", [mean, mean], [sq_mean], name=sq_mean),
            helper.make_node("Sub", [mean_sq, sq_mean], [var], name=var),
            helper.make_node("Relu", [var], [pos], name=pos),
            helper.make_node("Sqrt", [pos], [std], name=std)])
        parts += [mean, std]
    out = _unique(taken, OOD_FEATURES)
    graph.node.append(helper.make_node("Concat", parts, [out], axis=1, name=name("concat")))
    graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                      [_batch_dim(graph), stages.dim]))
    return out, stages.dim


def _batch_dim(graph) -> Any:
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    return batch.dim_param or "N" if not batch.HasField("dim_value") else batch.dim_value


def add_explain_outputs(proto: "onnx.ModelProto") -> tuple[dict[str, str], dict[str, Any], Head]:
    """Add `feature_map` and `pooled` outputs to `proto` in place (idempotent).

    A ResNet-like graph also gets `ood_features` (`add_ood_features`), what OOD statistics
    are fit on. Returns (contract `outputs`, contract `cam`, the head found).
    """
    import onnx
    from onnx import TensorProto, helper

    head = find_head(proto)
    graph = proto.graph
    existing = {o.name for o in graph.output}
    taken = {t for n in graph.node for t in (*n.input, *n.output)} | existing | {
        i.name for i in graph.initializer} | {i.name for i in graph.input}
    k = len(head.weights)
    fm_shape = _inferred_shape(proto, head.feature_map)
    if fm_shape is not None and len(fm_shape) != 4:
        raise _fail(f"the pooling's input has {len(fm_shape)} dimensions, not 4 (NCHW)")
    if fm_shape is not None and isinstance(fm_shape[1], int) and fm_shape[1] != k:
        raise _fail(f"the feature map has {fm_shape[1]} channels but the head reads {k}")
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or "N" if not batch.HasField("dim_value") else batch.dim_value
    outputs = {PROBABILITY: head.probability}
    for role, source, shape in (
            (FEATURE_MAP, head.feature_map,
             [batch_dim, k, *(fm_shape[2:] if fm_shape else [None, None])]),
            (POOLED, head.pooled, [batch_dim, k])):
        if role in existing and any(n.op_type == "Identity" and n.output[0] == role
                                    and n.name.startswith(PREFIX) for n in graph.node):
            outputs[role] = role  # added before: augmenting twice changes nothing
            continue
        name = _unique(taken, role)
        src = source
        if role == POOLED and head.pooled_needs_flatten:
            src = _unique(taken, PREFIX + "pooled_flat")
            graph.node.append(helper.make_node("Flatten", [source], [src], axis=1,
                                               name=_unique(taken, PREFIX + "flatten")))
        graph.node.append(helper.make_node("Identity", [src], [name],
                                           name=_unique(taken, PREFIX + role)))
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        outputs[role] = name
    features = add_ood_features(proto, head)
    if features is not None:
        outputs[OOD_FEATURES] = features[0]
    cells = [int(d) for d in fm_shape[2:]] if fm_shape and all(
        isinstance(d, int) and d > 0 for d in fm_shape[2:]) else None
    cam: dict[str, Any] = {"weights": [float(v) for v in head.weights], "bias": head.bias}
    if cells:
        cam["cells"] = cells
    onnx.checker.check_model(proto)
    return outputs, cam, head


def add_ood_output(proto: "onnx.ModelProto", pooled: str, mean: np.ndarray,
                   whitening: np.ndarray) -> str:
    """Add `ood_score` = ||(pooled - mean) @ whitening|| to `proto` in place; return its name.

    An earlier ood_score (and its initializers) is replaced.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    _remove_ood(graph)
    taken = {t for n in graph.node for t in (*n.input, *n.output)} | {
        o.name for o in graph.output} | {i.name for i in graph.initializer} | {
        i.name for i in graph.input}
    k = len(mean)
    if whitening.shape[0] != k:
        raise ValueError(f"whitening is {whitening.shape}, features have {k} dimensions")
    names = {key: _unique(taken, PREFIX + key) for key in
             ("ood_mean", "ood_whitening", "ood_axes", "ood_centred", "ood_z", "ood_z2",
              "ood_d2")}
    graph.initializer.extend([
        numpy_helper.from_array(mean.astype(np.float32), names["ood_mean"]),
        numpy_helper.from_array(whitening.astype(np.float32), names["ood_whitening"])])
    reduce_kw: dict[str, Any] = {"keepdims": 0}
    reduce_in = [names["ood_z2"]]
    if _opset(proto) >= 13:  # ReduceSum takes its axes as an input from opset 13 on
        graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64),
                                                         names["ood_axes"]))
        reduce_in.append(names["ood_axes"])
    else:
        reduce_kw["axes"] = [1]
    out = _unique(taken, OOD_SCORE)
    graph.node.extend([
        helper.make_node("Sub", [pooled, names["ood_mean"]], [names["ood_centred"]],
                         name=PREFIX + "ood_sub"),
        helper.make_node("MatMul", [names["ood_centred"], names["ood_whitening"]],
                         [names["ood_z"]], name=PREFIX + "ood_matmul"),
        helper.make_node("Mul", [names["ood_z"], names["ood_z"]], [names["ood_z2"]],
                         name=PREFIX + "ood_square"),
        helper.make_node("ReduceSum", reduce_in, [names["ood_d2"]], name=PREFIX + "ood_sum",
                         **reduce_kw),
        helper.make_node("Sqrt", [names["ood_d2"]], [out], name=PREFIX + "ood_sqrt")])
    graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                      [_batch_dim(graph)]))
    onnx.checker.check_model(proto)
    return out


def _remove_ood(graph) -> None:
    ours = [n for n in graph.node if n.name.startswith(PREFIX + "ood_")]
    if not ours:
        return
    produced = {o for n in ours for o in n.output}
    consumed = {i for n in ours for i in n.input}
    for n in ours:
        graph.node.remove(n)
    for o in [o for o in graph.output if o.name in produced]:
        graph.output.remove(o)
    for i in [i for i in graph.initializer
              if i.name in consumed and i.name.startswith(PREFIX + "ood_")]:
        graph.initializer.remove(i)


def augment(data: bytes, meta: ModelMeta, *, ood: "OodStats | None" = None
            ) -> tuple[bytes, ModelMeta]:
    """A serialised fxscore model -> (the same model with heatmap outputs, and an OOD output
    when `ood` is given, metadata and digest re-embedded; its metadata).

    The probability path is untouched. Raises ExplainGraphError for a graph without an
    fxscore head.
    """
    import onnx

    from .modelfile import embed_bytes

    proto = onnx.load_from_string(data)
    outputs, cam, head = add_explain_outputs(proto)
    extra: dict[str, Any] = {}
    if ood is not None:
        source = _ood_source(proto, head, outputs, ood.feature)
        if len(ood.mean) != source[1]:
            raise ValueError(f"OOD statistics have {len(ood.mean)} features, the model's "
                             f"{ood.feature} features have {source[1]}; fit them again with "
                             "this model (`fxscore augment --ood-fit`)")
        outputs[OOD_SCORE] = add_ood_output(proto, source[0], ood.mean, ood.whitening())
        extra["ood"] = ood.contract()
    elif meta.ood:
        # Statistics stay with the graph they were fit on; re-augmenting without new ones
        # keeps them (the ood_score output is still in the graph).
        outputs[OOD_SCORE] = meta.outputs.get(OOD_SCORE, OOD_SCORE)
        extra["ood"] = meta.ood
    new_meta = dataclasses.replace(meta, outputs=outputs, cam=cam, **extra)
    return embed_bytes(proto.SerializeToString(), new_meta), new_meta


def _ood_source(proto, head: Head, outputs: dict[str, str], feature: str) -> tuple[str, int]:
    """(graph output, dim) that OOD statistics of layout `feature` measure a distance on."""
    if feature == "pooled":
        return outputs[POOLED], len(head.weights)
    if feature == STATS_FEATURE and OOD_FEATURES in outputs:
        stages = find_stages(proto, head)
        if stages is not None:
            return outputs[OOD_FEATURES], stages.dim
    raise ValueError(f"OOD statistics of features {feature!r} do not fit this graph (it has "
                     f"{'no ' if OOD_FEATURES not in outputs else ''}{OOD_FEATURES} output); "
                     "fit them with this model (`fxscore augment --ood-fit`)")


def augment_file(source: "str | os.PathLike[str]", out: "str | os.PathLike[str]", *,
                 ood_files: "Sequence[Path] | None" = None,
                 ood_holdout: "Sequence[Path] | None" = None,
                 false_flag_rate: float | None = None, threads: int | None = None,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write a copy of the fxscore model `source` with heatmap outputs (and, given
    `ood_files`, OOD statistics fit on them, the threshold on `ood_holdout` when given, else
    out of fold; `fxscore.ood.fit_ood`) to `out`, atomically; return what was done.

    The source is loaded with the scorer's loader first (contract, digest or pin checked), so
    a damaged file is refused rather than given a fresh digest. Torch-free.
    """
    from pathlib import Path

    from .atomicfile import write_files
    from .model import load_model

    src = load_model(source, threads=threads)
    data, meta = augment(Path(src.path).read_bytes(), src.meta)
    report: dict[str, Any] = {"source": str(source), "source_integrity": src.integrity,
                              "outputs": meta.outputs, "cells": meta.cam.get("cells")}
    if ood_files is not None:
        from . import ood as ood_mod

        report["ood"] = ood_mod.embed_ood_bytes(data, meta, ood_files, threads=threads,
                                                false_flag_rate=false_flag_rate,
                                                holdout=ood_holdout, progress=progress)
        data, meta = report["ood"].pop("_result")
    write_files({Path(out): data})
    check = load_model(out, threads=threads)  # the scorer's own checks, on what was written
    report["out"], report["model_id"], report["integrity"] = str(out), check.model_id, check.integrity
    return report


def augment_in_place(path: "str | os.PathLike[str]", *,
                     ood_files: "Sequence[Path] | None" = None,
                     ood_holdout: "Sequence[Path] | None" = None,
                     false_flag_rate: float | None = None,
                     threads: int | None = None) -> tuple[ModelMeta, dict[str, Any]]:
    """Rewrite the model file at `path` (atomically) with heatmap outputs and, given
    `ood_files`, OOD statistics (threshold on `ood_holdout`, else out of fold) -> (its new
    metadata, a report).

    For `fxscore export`, on the verified staged files just before they are published: after
    parity and int8 quantisation, which thus never see the added outputs. Too few readable
    grey images for OOD statistics is not a failure: the model gets heatmap outputs only and
    the report says why (`ood_skipped`). Every other metadata entry of the file is kept.
    """
    from pathlib import Path

    from .atomicfile import write_files
    from .contract import ModelMeta as Meta
    from .modelfile import read_props

    path = Path(path)
    data = path.read_bytes()
    meta = Meta.from_props(read_props(data), str(path))
    data, meta = augment(data, meta)
    report: dict[str, Any] = {"outputs": meta.outputs, "cells": meta.cam.get("cells")}
    if ood_files is not None:
        from . import ood as ood_mod

        try:
            summary = ood_mod.embed_ood_bytes(data, meta, ood_files, threads=threads,
                                              false_flag_rate=false_flag_rate,
                                              holdout=ood_holdout)
        except ood_mod.OodError as e:
            report["ood_skipped"] = str(e)
        else:
            data, meta = summary.pop("_result")
            report["ood"] = summary
    write_files({path: data})
    return meta, report
