"""An exact reference for fxscore's int8 (QDQ) graphs: integer arithmetic in numpy.

onnxruntime runs DequantizeLinear -> Conv -> QuantizeLinear as one integer convolution
(QLinearConv): uint8 activations times int8 weights summed in int32, plus the int32 bias, then
rescaled once in float32 (accumulator x (x_scale * w_scale / y_scale)), rounded half to even and
clamped. DequantizeLinear -> Add -> QuantizeLinear becomes QLinearAdd, MaxPool runs on the
uint8 values. This module computes the same thing with sums that cannot saturate or round:
integer-valued float64 matrix products (exact below 2**53; these stay below 2**27), then the
same float32 rescaling. What is left in float (the head) is plain numpy float32.

So where onnxruntime's kernels compute exact integer sums (VNNI always; AVX2 when no pair of
u8 x s8 products overflows int16) its output equals this reference up to float32 rounding in
the head, about 1e-7 in probability; a saturating kernel misses it by orders of magnitude more.

Not a general ONNX evaluator: it knows the operators fxscore's quantiser emits and raises
NotImplementedError on any other.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

F32 = np.float32


@dataclass
class Dq:
    """A dequantised tensor, kept as its integers: value = (q - zero_point) * scale."""

    q: np.ndarray  # int64
    scale: np.ndarray  # float32, scalar or per channel along `axis`
    zero_point: np.ndarray  # int64, same shape as scale
    axis: int = 1
    qmin: int = 0
    qmax: int = 255

    def centred(self) -> np.ndarray:
        return self.q - _along(self.zero_point, self.axis, self.q.ndim)

    def value(self) -> np.ndarray:
        return (self.centred().astype(F32) * _along(self.scale, self.axis, self.q.ndim)).astype(F32)


@dataclass
class Acc:
    """A convolution's exact int32 accumulator, before requantisation."""

    acc: np.ndarray  # int64, NCHW
    scale: np.ndarray  # float32 per output channel: x_scale * w_scale


@dataclass
class Sum:
    """A float Add of two dequantised tensors, before requantisation (QLinearAdd)."""

    a: Dq
    b: Dq


def run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The graph's first output for input `x`, computed exactly as described above."""
    g = proto.graph
    env: dict[str, object] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    env[g.input[0].name] = np.asarray(x, dtype=F32)
    for node in g.node:  # ONNX stores nodes in topological order
        ins = [env[i] if i else None for i in node.input]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        op = _OPS.get(node.op_type)
        if op is None:
            raise NotImplementedError(f"int8 reference: operator {node.op_type}")
        out = op(ins, attrs)
        env[node.output[0]] = out
    return _float(env[g.output[0].name])


# ---------------------------------------------------------------------------- operators


def _quantize(ins, attrs):
    x, scale, zp = ins[0], np.asarray(ins[1], F32), np.asarray(ins[2])
    info = np.iinfo(zp.dtype)
    axis = attrs.get("axis", 1)
    zp64 = zp.astype(np.int64)
    if isinstance(x, Acc):  # QLinearConv's requantisation: float32(acc) * (sx * sw / sy)
        assert scale.size == 1 and zp.size == 1
        multiplier = (x.scale.astype(F32) / scale.reshape(())).astype(F32)
        y = x.acc.astype(F32) * _along(multiplier, 1, x.acc.ndim)
    elif isinstance(x, Sum):  # QLinearAdd: a's and b's integers rescaled to the output's scale
        ra = (x.a.scale / scale).astype(F32)
        rb = (x.b.scale / scale).astype(F32)
        y = x.a.centred().astype(F32) * ra + x.b.centred().astype(F32) * rb
    elif isinstance(x, Dq):
        if np.array_equal(x.scale, scale) and np.array_equal(x.zero_point, zp64):
            return x  # MaxPool / Reshape between a Q-DQ pair sharing parameters
        y = (x.value() / _along(scale, axis, x.q.ndim)).astype(F32)
    else:
        y = (np.asarray(x, F32) / _along(scale, axis, np.ndim(x))).astype(F32)
    q = np.rint(y.astype(F32)).astype(np.int64) + _along(zp64, axis, np.ndim(y))
    return Dq(np.clip(q, info.min, info.max), scale, zp64, axis, int(info.min), int(info.max))


def _dequantize(ins, attrs):
    x = ins[0]
    if isinstance(x, Dq):  # DequantizeLinear of a QuantizeLinear output
        return x
    q = np.asarray(x)
    scale = np.asarray(ins[1], F32)
    zp = np.asarray(ins[2]).astype(np.int64) if len(ins) > 2 and ins[2] is not None else \
        np.zeros_like(scale, dtype=np.int64)
    return Dq(q.astype(np.int64), scale, zp, attrs.get("axis", 1))


def _conv(ins, attrs):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    if not (isinstance(x, Dq) and isinstance(w, Dq)) or attrs.get("group", 1) != 1:
        raise NotImplementedError("int8 reference: Conv of float tensors, or grouped")
    acc = _conv_int(x.centred(), w.centred(), attrs)
    scale = (x.scale.reshape(()) * w.scale).astype(F32)  # per output channel
    if b is not None:
        assert isinstance(b, Dq) and np.all(b.zero_point == 0)
        acc = acc + b.q[None, :, None, None]
    return Acc(acc, scale)


def _conv_int(x: np.ndarray, w: np.ndarray, attrs) -> np.ndarray:
    n, c, h, wd = x.shape
    m, _, kh, kw = w.shape
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    pt, pl, pb, pr = attrs.get("pads", [0, 0, 0, 0])
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))  # zero in the centred domain
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, oh, ow), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh:i * dh + sh * oh:sh, j * dw:j * dw + sw * ow:sw]
    cols = cols.reshape(n, c * kh * kw, oh * ow)
    out = np.einsum("mk,nkp->nmp", w.reshape(m, -1).astype(np.float64), cols, optimize=True)
    return np.rint(out).astype(np.int64).reshape(n, m, oh, ow)  # integer-valued: exact


def _add(ins, attrs):
    a, b = ins
    if isinstance(a, Dq) and isinstance(b, Dq):
        return Sum(a, b)
    return (_float(a) + _float(b)).astype(F32)


def _maxpool(ins, attrs):
    x = ins[0]
    if not isinstance(x, Dq) or np.any(np.asarray(x.scale) <= 0):
        raise NotImplementedError("int8 reference: MaxPool of a float tensor")
    kh, kw = attrs["kernel_shape"]
    sh, sw = attrs.get("strides", [1, 1])
    pt, pl, pb, pr = attrs.get("pads", [0, 0, 0, 0])
    q = np.pad(x.q, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=np.iinfo(np.int64).min)
    h, w = q.shape[2:]
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = np.full(q.shape[:2] + (oh, ow), np.iinfo(np.int64).min)
    for i in range(kh):
        for j in range(kw):
            out = np.maximum(out, q[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw])
    return Dq(out, x.scale, x.zero_point, x.axis, x.qmin, x.qmax)


def _relu(ins, attrs):
    x = ins[0]
    if isinstance(x, Dq):
        return Dq(np.maximum(x.q, _along(x.zero_point, x.axis, x.q.ndim)), x.scale,
                  x.zero_point, x.axis, x.qmin, x.qmax)
    return np.maximum(_float(x), F32(0))


def _reduce_mean(ins, attrs):
    axes = attrs.get("axes")
    if axes is None and len(ins) > 1 and ins[1] is not None:
        axes = np.asarray(ins[1]).tolist()
    return np.mean(_float(ins[0]), axis=tuple(axes), keepdims=bool(attrs.get("keepdims", 1)),
                   dtype=F32)


def _gap(ins, attrs):
    return np.mean(_float(ins[0]), axis=(2, 3), keepdims=True, dtype=F32)


def _reshape(ins, attrs):
    x = ins[0]
    shape = [int(d) for d in np.asarray(ins[1])]
    src = x.q if isinstance(x, Dq) else _float(x)
    shape = [src.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    if isinstance(x, Dq) and x.scale.size == 1:
        return Dq(x.q.reshape(shape), x.scale, x.zero_point, x.axis, x.qmin, x.qmax)
    return _float(x).reshape(shape)


def _flatten(ins, attrs):
    x = _float(ins[0])
    axis = attrs.get("axis", 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _squeeze(ins, attrs):
    axes = attrs.get("axes") or (np.asarray(ins[1]).tolist() if len(ins) > 1 else None)
    return np.squeeze(_float(ins[0]), axis=tuple(axes) if axes is not None else None)


def _gemm(ins, attrs):
    a, b = _float(ins[0]), _float(ins[1])
    if attrs.get("transA", 0):
        a = a.T
    if attrs.get("transB", 0):
        b = b.T
    y = F32(attrs.get("alpha", 1.0)) * (a @ b)
    if len(ins) > 2 and ins[2] is not None:
        y = y + F32(attrs.get("beta", 1.0)) * _float(ins[2])
    return y.astype(F32)


def _sigmoid(ins, attrs):
    x = _float(ins[0]).astype(np.float64)
    return (1 / (1 + np.exp(-x))).astype(F32)


_OPS = {"QuantizeLinear": _quantize, "DequantizeLinear": _dequantize, "Conv": _conv,
        "Add": _add, "MaxPool": _maxpool, "Relu": _relu, "ReduceMean": _reduce_mean,
        "GlobalAveragePool": _gap, "Reshape": _reshape, "Flatten": _flatten,
        "Squeeze": _squeeze, "Gemm": _gemm, "MatMul": lambda ins, a: _float(ins[0]) @ _float(ins[1]),
        "Sigmoid": _sigmoid, "Identity": lambda ins, a: ins[0]}


def _float(x) -> np.ndarray:
    if isinstance(x, Dq):
        return x.value()
    if isinstance(x, Acc):
        return (x.acc.astype(np.float64) * x.scale[None, :, None, None]).astype(F32)
    if isinstance(x, Sum):
        return (x.a.value() + x.b.value()).astype(F32)
    return np.asarray(x)


def _along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast along `axis` of an ndim array (scalars as is)."""
    v = np.asarray(v)
    if v.ndim == 0 or v.size == 1 or ndim == 0:
        return v.reshape(()) if v.size == 1 else v
    shape = [1] * ndim
    shape[axis] = v.size
    return v.reshape(shape)
