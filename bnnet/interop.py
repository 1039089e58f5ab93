"""PyTorch interop for sequential nets: Linear, Conv2d, BatchNorm1d/2d/3d, LayerNorm, GroupNorm,
InstanceNorm2d, Dropout, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, ReLU, LeakyReLU, Sigmoid, Tanh.

    model = bnnet.interop.from_torch(torch_module_or_state_dict)
    module = bnnet.interop.to_torch(model)

Carried over: weights (torch's Linear.weight is bnnet's W transposed; Conv2d's
weight is bnnet's W as is), strides and padding, running
statistics, eps, the running-average weight (bnnet decay = 1 - torch momentum;
momentum=None <-> decay=None) and num_batches_tracked <-> count. torch is imported
only when these functions run; it is not a dependency of bnnet.
"""

import re

import numpy as np

from .conv import AvgPool2d, Conv2d, Flatten, GlobalAvgPool2d, MaxPool2d
from .conventions import decay_from_torch_momentum, torch_momentum_from_decay
from .dropout import Dropout
from .engine import check_chain
from .errors import HyperparameterError
from .layers import ACTIVATIONS, BatchNorm, LeakyReLU, Linear, ReLU, Sigmoid, Tanh
from .model import Sequential
from .normalization import BatchRenorm, GhostBatchNorm, GroupNorm, InstanceNorm2d, LayerNorm

_TORCH_PARAM_NAMES = {"W": "weight", "b": "bias", "gamma": "weight", "beta": "bias"}
_TORCH_ACTIVATIONS = {"ReLU": ReLU, "Sigmoid": Sigmoid, "Tanh": Tanh}


def _numpy(t):
    return t if isinstance(t, np.ndarray) else t.detach().cpu().numpy()


def _linear(weight, bias):
    w = _numpy(weight)  # (out, in)
    layer = Linear(w.shape[1], w.shape[0], bias=bias is not None, rng=0, dtype=w.dtype.name)
    layer.params["W"][...] = w.T
    if bias is not None:
        layer.params["b"][...] = _numpy(bias)
    return layer


def _conv(child):
    """A Conv2d from torch's nn.Conv2d (zero padding given as ints, no dilation or groups)."""
    if isinstance(child.padding, str) or child.dilation != (1, 1) or child.groups != 1 or child.padding_mode != "zeros":
        raise HyperparameterError(
            f"from_torch: cannot convert {child}: bnnet's Conv2d has integer zero padding, no dilation and no groups"
        )
    w = _numpy(child.weight)  # (O, C, kh, kw), bnnet's layout
    layer = Conv2d(
        w.shape[1],
        w.shape[0],
        w.shape[2:],
        stride=child.stride,
        padding=child.padding,
        bias=child.bias is not None,
        rng=0,
        dtype=w.dtype.name,
    )
    layer.params["W"][...] = w
    if child.bias is not None:
        layer.params["b"][...] = _numpy(child.bias)
    return layer


def _pool(child):
    """A MaxPool2d / AvgPool2d / GlobalAvgPool2d from torch's pooling modules, refusing options bnnet lacks."""
    import torch

    if isinstance(child, torch.nn.AdaptiveAvgPool2d):
        if child.output_size not in (1, (1, 1)):
            raise HyperparameterError(f"from_torch: cannot convert {child}: only output_size=1 (global average)")
        return GlobalAvgPool2d()
    if child.ceil_mode or (
        isinstance(child, torch.nn.MaxPool2d) and (child.dilation not in (1, (1, 1)) or child.return_indices)
    ):
        raise HyperparameterError(
            f"from_torch: cannot convert {child}: ceil_mode, dilation and return_indices are not supported"
        )
    if isinstance(child, torch.nn.AvgPool2d) and (not child.count_include_pad or child.divisor_override):
        raise HyperparameterError(
            f"from_torch: cannot convert {child}: bnnet's AvgPool2d divides by the kernel "
            "area (count_include_pad=True, no divisor_override)"
        )
    cls = MaxPool2d if isinstance(child, torch.nn.MaxPool2d) else AvgPool2d
    return cls(child.kernel_size, stride=child.stride, padding=child.padding)


def _batchnorm(num_features, weight, bias, mean, var, count, eps, momentum, dtype):
    """A BatchNorm from torch's tensors; weight/bias None: affine=False; mean/var None: no running statistics."""
    bn = BatchNorm(
        num_features,
        eps=float(eps),
        decay=decay_from_torch_momentum(momentum),
        dtype=dtype,
        affine=weight is not None,
        track_running_stats=mean is not None,
    )
    if weight is not None:
        bn.params["gamma"][...] = _numpy(weight)
        bn.params["beta"][...] = _numpy(bias)
    if mean is not None:
        bn.buffers["running_mean"][...] = _numpy(mean)
        bn.buffers["running_var"][...] = _numpy(var)
        bn.buffers["count"][...] = int(count)
    return bn


def _per_sample_norm(child):
    """A LayerNorm, GroupNorm or InstanceNorm2d from torch's module (without running statistics)."""
    import torch

    dtype = next((str(t.dtype).removeprefix("torch.") for t in child.parameters()), "float32")
    if isinstance(child, torch.nn.LayerNorm):
        if len(child.normalized_shape) != 1 or not child.elementwise_affine or child.bias is None:
            raise HyperparameterError(
                f"from_torch: cannot convert {child}: bnnet's LayerNorm normalizes the last axis, with gamma and beta"
            )
        layer = LayerNorm(child.normalized_shape[0], eps=child.eps, dtype=dtype)
        affine = True
    elif isinstance(child, torch.nn.GroupNorm):
        layer = GroupNorm(child.num_groups, child.num_channels, eps=child.eps, affine=child.affine, dtype=dtype)
        affine = child.affine
    else:
        if child.track_running_stats:
            raise HyperparameterError(
                f"from_torch: cannot convert {child}: bnnet's InstanceNorm2d keeps no running statistics"
            )
        layer = InstanceNorm2d(child.num_features, eps=child.eps, affine=child.affine, dtype=dtype)
        affine = child.affine
    if affine:
        layer.params["gamma"][...] = _numpy(child.weight)
        layer.params["beta"][...] = _numpy(child.bias)
    return layer


def from_torch(module, activation="relu", eps=1e-5, momentum=0.1):
    """A bnnet Sequential equal to a torch MLP (nn.Sequential) or to its state_dict.

    A state_dict has no parameter-free layers and no BatchNorm settings: positions
    with no parameters are filled with `activation`, and BatchNorm layers get
    `eps` and `momentum` (torch's defaults). A module carries all of that itself.
    """
    import torch

    if isinstance(module, torch.nn.Module):
        layers = []
        for child in module.children() if isinstance(module, torch.nn.Sequential) else [module]:
            name = type(child).__name__
            if isinstance(child, torch.nn.Linear):
                layers.append(_linear(child.weight, child.bias))
            elif isinstance(child, torch.nn.Conv2d):
                layers.append(_conv(child))
            elif isinstance(child, (torch.nn.MaxPool2d, torch.nn.AvgPool2d, torch.nn.AdaptiveAvgPool2d)):
                layers.append(_pool(child))
            elif isinstance(child, torch.nn.Flatten):
                if child.start_dim != 1 or child.end_dim != -1:
                    raise HyperparameterError(f"from_torch: cannot convert {child}: only Flatten(1, -1)")
                layers.append(Flatten())
            elif isinstance(child, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                dtype = next(
                    (str(t.dtype).removeprefix("torch.") for t in child.state_dict().values() if t.is_floating_point()),
                    "float32",
                )  # no tensors at all: torch's default
                layers.append(
                    _batchnorm(
                        child.num_features,
                        child.weight,
                        child.bias,
                        child.running_mean,
                        child.running_var,
                        child.num_batches_tracked,
                        child.eps,
                        child.momentum,
                        dtype,
                    )
                )
            elif isinstance(child, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.InstanceNorm2d)):
                layers.append(_per_sample_norm(child))
            elif isinstance(child, torch.nn.Dropout):
                layers.append(Dropout(child.p))
            elif isinstance(child, torch.nn.LeakyReLU):
                layers.append(LeakyReLU(child.negative_slope))
            elif name in _TORCH_ACTIVATIONS:
                layers.append(_TORCH_ACTIVATIONS[name]())
            else:
                raise HyperparameterError(
                    f"from_torch: cannot convert {name}; supported: Linear, Conv2d, "
                    "BatchNorm1d/2d/3d, LayerNorm, GroupNorm, InstanceNorm2d, Dropout, MaxPool2d, AvgPool2d, "
                    "AdaptiveAvgPool2d(1), Flatten, ReLU, LeakyReLU, Sigmoid, Tanh inside an nn.Sequential"
                )
            layer = layers[-1]  # requires_grad=False: frozen in bnnet (its key named as torch names it)
            frozen = {name for name, p in child.named_parameters(recurse=False) if not p.requires_grad}
            layer.set_frozen(layer.frozen_params | {k for k in layer.params if _TORCH_PARAM_NAMES[k] in frozen})
        # A BatchNorm without tensors (affine=False, track_running_stats=False) says no dtype: the model's
        dtypes = {layer.dtype for layer in layers if getattr(layer, "dtype", None) and (layer.params or layer.buffers)}
        for layer in layers:
            if isinstance(layer, BatchNorm) and not layer.params and not layer.buffers and len(dtypes) == 1:
                layer.dtype = next(iter(dtypes))
        return Sequential(*layers)
    state = dict(module)
    if activation not in ACTIVATIONS:
        raise HyperparameterError(f"from_torch: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"(\d+)\.", k))})
    if not indices or len(indices) != len({k.split(".")[0] for k in state}):
        raise HyperparameterError("from_torch: a state_dict must have keys like '0.weight' (an nn.Sequential's)")
    layers = []
    for i in range(indices[-1] + 1):
        get = lambda key, i=i: state.get(f"{i}.{key}")  # noqa: E731
        if get("running_mean") is not None:
            mean = _numpy(get("running_mean"))
            layers.append(
                _batchnorm(
                    len(mean),
                    get("weight"),
                    get("bias"),
                    mean,
                    get("running_var"),
                    get("num_batches_tracked") if get("num_batches_tracked") is not None else 0,
                    eps,
                    momentum,
                    mean.dtype.name,
                )
            )
        elif get("weight") is not None:
            if _numpy(get("weight")).ndim != 2:
                raise HyperparameterError(
                    f"from_torch: {i}.weight is a convolution's; its stride and padding are "
                    "not in a state_dict: convert the module itself"
                )
            layers.append(_linear(get("weight"), get("bias")))
        else:
            layers.append(ACTIVATIONS[activation]())
    return Sequential(*layers)


def to_torch(model, input_shape=None):
    """A torch nn.Sequential equal to `model` (same dtype, weights, statistics and conventions).

    input_shape: the per-sample input shape, e.g. (C, D, H, W), which decides BatchNorm1d, 2d or 3d for
    a BatchNorm the model itself does not fix (one that comes first); default: what the layers imply.
    A frozen parameter (Sequential.freeze) becomes requires_grad=False.
    """
    import torch

    mods = []
    # the per-sample input shape of each layer: BatchNorm1d, 2d or 3d
    shapes = check_chain(model.layers, None if input_shape is None else tuple(input_shape))
    for layer, (shape, _) in zip(model.layers, shapes):
        if isinstance(layer, Conv2d):
            m = torch.nn.Conv2d(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                bias=layer.bias,
                dtype=getattr(torch, layer.dtype),
            )
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(layer.params["W"]))
                if layer.bias:
                    m.bias.copy_(torch.from_numpy(layer.params["b"]))
        elif isinstance(layer, (MaxPool2d, AvgPool2d)):
            m = getattr(torch.nn, type(layer).__name__)(layer.kernel_size, stride=layer.stride, padding=layer.padding)
        elif isinstance(layer, GlobalAvgPool2d):
            mods.append(torch.nn.AdaptiveAvgPool2d(1))
            m = torch.nn.Flatten()
        elif isinstance(layer, Flatten):
            m = torch.nn.Flatten()
        elif isinstance(layer, Linear):
            m = torch.nn.Linear(
                layer.in_features, layer.out_features, bias=layer.bias, dtype=getattr(torch, layer.dtype)
            )
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(np.ascontiguousarray(layer.params["W"].T)))
                if layer.bias:
                    m.bias.copy_(torch.from_numpy(layer.params["b"]))
        elif isinstance(layer, (BatchRenorm, GhostBatchNorm)):
            raise HyperparameterError(
                f"to_torch: torch has no {type(layer).__name__} (layer {model.layers.index(layer)}); its train mode "
                "would differ. Convert a copy with plain BatchNorm layers, or use bnnet.fold_batchnorm for inference"
            )
        elif isinstance(layer, BatchNorm) and layer.frozen:
            raise HyperparameterError(
                f"to_torch: layer {model.layers.index(layer)} is a BatchNorm frozen by freeze_batchnorm, which "
                "torch's BatchNorm has no setting for; convert before freezing and call .eval() on that module"
            )
        elif isinstance(layer, LayerNorm):
            m = torch.nn.LayerNorm(layer.num_features, eps=layer.eps, dtype=getattr(torch, layer.dtype))
        elif isinstance(layer, InstanceNorm2d):
            m = torch.nn.InstanceNorm2d(
                layer.num_features, eps=layer.eps, affine=layer.affine, dtype=getattr(torch, layer.dtype)
            )
        elif isinstance(layer, GroupNorm):
            m = torch.nn.GroupNorm(
                layer.num_groups,
                layer.num_features,
                eps=layer.eps,
                affine=layer.affine,
                dtype=getattr(torch, layer.dtype),
            )
        elif isinstance(layer, Dropout):
            m = torch.nn.Dropout(layer.p)
        elif isinstance(layer, BatchNorm):
            if layer.axis != 1:
                raise HyperparameterError(
                    "to_torch: torch's BatchNorm takes channels on axis 1; this layer has axis=-1 (channels last)"
                )
            if shape is None:  # (a BatchNorm that comes first: the next layer says the rank)
                shape = next((s for s, _ in shapes if s is not None), None)
            kind = {3: torch.nn.BatchNorm2d, 4: torch.nn.BatchNorm3d}.get(len(shape or ()), torch.nn.BatchNorm1d)
            m = kind(
                layer.num_features,
                eps=layer.eps,
                momentum=torch_momentum_from_decay(layer.decay),
                affine=layer.center or layer.scale,
                track_running_stats=layer.track_running_stats,
                dtype=getattr(torch, layer.dtype),
            )
            with torch.no_grad():
                if layer.center or layer.scale:
                    gamma, beta, _, _ = layer._affine()  # (1 or 0 for the one not learned: fixed in torch)
                    m.weight.copy_(torch.from_numpy(np.array(gamma))).requires_grad_(layer.scale)
                    m.bias.copy_(torch.from_numpy(np.array(beta))).requires_grad_(layer.center)
                if layer.track_running_stats:
                    m.running_mean.copy_(torch.from_numpy(layer.buffers["running_mean"]))
                    m.running_var.copy_(torch.from_numpy(layer.buffers["running_var"]))
                    m.num_batches_tracked.fill_(int(layer.buffers["count"]))
            if layer.running_var == "biased":
                raise HyperparameterError(
                    "to_torch: torch's BatchNorm1d keeps the unbiased running variance; "
                    "this layer uses running_var='biased'"
                )
        elif isinstance(layer, LeakyReLU):
            m = torch.nn.LeakyReLU(layer.negative_slope)
        else:
            m = {"ReLU": torch.nn.ReLU, "Sigmoid": torch.nn.Sigmoid, "Tanh": torch.nn.Tanh}[type(layer).__name__]()
        if isinstance(layer, (LayerNorm, GroupNorm)) and layer.affine:
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(layer.params["gamma"]))
                m.bias.copy_(torch.from_numpy(layer.params["beta"]))
        for key in layer.frozen_params:  # a frozen parameter: requires_grad=False in the twin
            getattr(m, _TORCH_PARAM_NAMES[key]).requires_grad_(False)
        mods.append(m)
    return torch.nn.Sequential(*mods)
