"""ONNX export: the eval-mode network as an ONNX graph (Gemm/MatMul, Conv, BatchNormalization,
LayerNormalization, InstanceNormalization (GroupNorm through a reshape), pools, Flatten, activations;
Dropout is the identity in eval mode).

Needs the `onnx` package (pip install ".[onnx]" in the checkout); imported only here.
"""

import numpy as np

from .conv import AvgPool2d, Conv2d, Flatten, GlobalAvgPool2d, MaxPool2d
from .dropout import Dropout
from .engine import check_chain
from .errors import HyperparameterError
from .inference import fold_batchnorm
from .io import atomic_write
from .layers import BatchNorm, LeakyReLU, Linear, ReLU, Sigmoid, Tanh
from .normalization import GroupNorm, LayerNorm

OPSET = 17
IR_VERSION = 9  # what onnxruntime >= 1.15 reads


def to_onnx(model, fold=False):
    """The ONNX ModelProto of `model` in eval mode (input "x": (N, in) or (N, C, H, W), output "y": (N, out)).

    fold=True first folds each Linear -> BatchNorm (Conv2d -> BatchNorm) pair into one Gemm (Conv)
    (bnnet.fold_batchnorm);
    otherwise each BatchNorm becomes a BatchNormalization node with the running statistics.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if fold:
        model = fold_batchnorm(model)
    elem = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}[model.dtype]
    nodes, inits = [], []
    h = "x"
    shapes = check_chain(model.layers)  # per-sample input shape of each layer (the rank BatchNorm sees)
    for i, (layer, (shape, _)) in enumerate(zip(model.layers, shapes)):
        out = f"h{i}"

        def const(name, array, i=i, dtype=None):
            inits.append(
                numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype or model.dtype), f"{i}.{name}")
            )
            return f"{i}.{name}"

        if isinstance(layer, Linear):
            if layer.bias:  # y = x @ W + b
                nodes.append(
                    helper.make_node("Gemm", [h, const("W", layer.params["W"]), const("b", layer.params["b"])], [out])
                )
            else:
                nodes.append(helper.make_node("MatMul", [h, const("W", layer.params["W"])], [out]))
        elif isinstance(layer, Conv2d):
            pads = [*layer.padding, *layer.padding]  # (top, left, bottom, right)
            inputs = [h, const("W", layer.params["W"])] + ([const("b", layer.params["b"])] if layer.bias else [])
            nodes.append(
                helper.make_node(
                    "Conv", inputs, [out], kernel_shape=list(layer.kernel_size), strides=list(layer.stride), pads=pads
                )
            )
        elif isinstance(layer, (MaxPool2d, AvgPool2d)):
            extra = {"count_include_pad": 1} if isinstance(layer, AvgPool2d) else {}
            nodes.append(
                helper.make_node(
                    "MaxPool" if isinstance(layer, MaxPool2d) else "AveragePool",
                    [h],
                    [out],
                    kernel_shape=list(layer.kernel_size),
                    strides=list(layer.stride),
                    pads=[*layer.padding, *layer.padding],
                    **extra,
                )
            )
        elif isinstance(layer, GlobalAvgPool2d):
            nodes.append(helper.make_node("GlobalAveragePool", [h], [f"{out}.pooled"]))
            nodes.append(helper.make_node("Flatten", [f"{out}.pooled"], [out], axis=1))
        elif isinstance(layer, Flatten):
            nodes.append(helper.make_node("Flatten", [h], [out], axis=1))
        elif isinstance(layer, BatchNorm) and layer.axis != 1:
            raise HyperparameterError(
                "export_onnx: ONNX BatchNormalization takes channels on axis 1; this layer has axis=-1 (channels last)"
            )
        elif isinstance(layer, BatchNorm) and layer.track_running_stats:
            gamma, beta, _, _ = layer._affine()  # 1 and 0 when affine=False
            nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    [
                        h,
                        const("gamma", gamma),
                        const("beta", beta),
                        const("running_mean", layer.buffers["running_mean"]),
                        const("running_var", layer.buffers["running_var"]),
                    ],
                    [out],
                    epsilon=float(layer.eps),
                )
            )
        elif isinstance(layer, BatchNorm):  # track_running_stats=False: the batch's own statistics, in eval too
            nodes += _batch_statistics_nodes(helper, h, out, f"{i}.", layer, const, 1 + len(shape or (0,)))
        elif isinstance(layer, LayerNorm):
            inputs = [h, const("gamma", layer.params["gamma"]), const("beta", layer.params["beta"])]
            nodes.append(helper.make_node("LayerNormalization", inputs, [out], axis=-1, epsilon=float(layer.eps)))
        elif isinstance(layer, GroupNorm):
            nodes += _group_norm_nodes(helper, h, out, f"{i}.", layer, const, 1 + len(shape or (0,)))
        elif isinstance(layer, Dropout):
            nodes.append(helper.make_node("Identity", [h], [out]))
        elif isinstance(layer, LeakyReLU):
            nodes.append(helper.make_node("LeakyRelu", [h], [out], alpha=float(layer.negative_slope)))
        elif isinstance(layer, (ReLU, Sigmoid, Tanh)):
            nodes.append(helper.make_node({ReLU: "Relu", Sigmoid: "Sigmoid", Tanh: "Tanh"}[type(layer)], [h], [out]))
        else:
            raise HyperparameterError(f"export_onnx: cannot export {type(layer).__name__}")
        h = out
    nodes[-1].output[0] = "y"
    dims = ["N", *(d if d is not None else name for d, name in zip(model.input_shape or (None,), "DHW"[-3:]))]
    graph = helper.make_graph(
        nodes,
        "bnnet",
        [helper.make_tensor_value_info("x", elem, dims)],
        [helper.make_tensor_value_info("y", elem, ["N", None])],
        initializer=inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bnnet")
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    return proto


def _batch_statistics_nodes(helper, x, out, prefix, layer, const, ndim):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with the mean and biased variance of x over
    every axis but the channel axis 1 (of an ndim-D x): what a BatchNorm without running statistics
    computes in every mode."""
    gamma, beta, _, _ = layer._affine()
    per_channel = (-1, *[1] * (ndim - 2))  # (C,) or (C, 1, 1) to broadcast over (N, C, H, W)
    gamma, beta = gamma.reshape(per_channel), beta.reshape(per_channel)
    axes = [0, *range(2, ndim)]
    n = [prefix + k for k in ("mean", "centered", "squared", "var", "var_eps", "std", "x_hat", "scaled")]
    return [
        helper.make_node("ReduceMean", [x], [n[0]], axes=axes, keepdims=1),
        helper.make_node("Sub", [x, n[0]], [n[1]]),
        helper.make_node("Mul", [n[1], n[1]], [n[2]]),
        helper.make_node("ReduceMean", [n[2]], [n[3]], axes=axes, keepdims=1),
        helper.make_node("Add", [n[3], const("eps", np.array(layer.eps))], [n[4]]),
        helper.make_node("Sqrt", [n[4]], [n[5]]),
        helper.make_node("Div", [n[1], n[5]], [n[6]]),
        helper.make_node("Mul", [n[6], const("gamma", gamma)], [n[7]]),
        helper.make_node("Add", [n[7], const("beta", beta)], [out]),
    ]


def _group_norm_nodes(helper, x, out, prefix, layer, const, ndim):
    """GroupNorm (and InstanceNorm2d) in opset 17: InstanceNormalization normalizes each channel of each
    sample, so x is viewed as (N, G, C/G * ...) first (one "channel" per group) and put back after;
    then gamma and beta per channel."""
    g = layer.num_groups
    per_channel = (-1, *[1] * (ndim - 2))  # (C,) or (C, 1, 1) to broadcast over (N, C, H, W)
    gamma, beta = (
        layer.params[k] if layer.affine else np.full(layer.num_features, v) for k, v in (("gamma", 1), ("beta", 0))
    )
    n = [prefix + k for k in ("shape", "grouped", "normalized", "ungrouped", "scaled")]
    nodes = [
        helper.make_node("Shape", [x], [n[0]]),
        helper.make_node("Reshape", [x, const("groups", np.array([0, g, -1]), dtype=np.int64)], [n[1]]),
        helper.make_node(
            "InstanceNormalization",
            [n[1], const("ones", np.ones(g)), const("zeros", np.zeros(g))],
            [n[2]],
            epsilon=float(layer.eps),
        ),  # fmt: skip
        helper.make_node("Reshape", [n[2], n[0]], [n[3]]),
        helper.make_node("Mul", [n[3], const("gamma", gamma.reshape(per_channel))], [n[4]]),
        helper.make_node("Add", [n[4], const("beta", beta.reshape(per_channel))], [out]),
    ]
    return nodes


def export_onnx(model, path, fold=False):
    """Write `model` (eval mode) as an ONNX file at `path`, atomically; see to_onnx. Returns the path."""
    atomic_write(path, to_onnx(model, fold=fold).SerializeToString())
    return path
