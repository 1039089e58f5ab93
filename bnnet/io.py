"""Checkpoints: one safetensors file of named arrays plus JSON metadata. No pickle anywhere.

Layout of the arrays:
    params/<dotted name>       e.g. params/0.W, params/1.gamma
    buffers/<dotted name>      e.g. buffers/1.running_mean, buffers/1.count
    optimizer/<param>/<state>  e.g. optimizer/0.W/m      (only when an optimizer is saved)
    extra/<name>               arrays fit's callbacks keep (e.g. EarlyStopping's best weights)
Metadata (the safetensors header's "__metadata__", key "bnnet", a JSON string):
    format, format_version, bnnet_version, architecture (layer configs, which
    carry the conventions eps/decay/running_var), optimizer (type, step,
    hyperparameters) and the user's own **metadata.
"""

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from .device import to_host
from .errors import BnnetError, CheckpointError, HyperparameterError
from .layers import LAYER_TYPES
from .model import Sequential
from .optim import Optimizer

FORMAT = "bnnet-checkpoint"
FORMAT_VERSION = 1


def atomic_write(path, data):
    """Write bytes to `path` so that a crash leaves either the old file or the new one, never half of one.

    The bytes go to a temporary file in the same folder, are flushed and
    fsync'ed, then renamed over `path` (an atomic rename on POSIX).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the mode open() would give (mkstemp's is 0600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def save(path, model, optimizer=None, *, extra_arrays=None, **metadata):
    """Save model parameters and buffers (and optimizer state) to one .safetensors file, atomically.

    Args:
        path: file to write (its folder is created).
        model: a Sequential.
        optimizer: optional Optimizer whose state (moments, step counter) is stored too.
        extra_arrays: optional {name: array} stored as extra/<name> (fit stores its callbacks' arrays here).
        **metadata: JSON-serializable values kept in the file (e.g. loss="softmax_cross_entropy").
    """
    from . import __version__

    if not isinstance(model, Sequential):
        raise TypeError(f"save: model must be a bnnet Sequential, got {type(model).__name__}")
    tensors = {f"params/{k}": v for k, v in model.params.items()}
    tensors.update({f"buffers/{k}": v for k, v in model.buffers.items()})
    opt_info = None
    if optimizer is not None:
        arrays, opt_info = optimizer.state_dict()
        tensors.update({f"optimizer/{k}": v for k, v in arrays.items()})
    tensors.update({f"extra/{k}": v for k, v in (extra_arrays or {}).items()})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bnnet_version": __version__,
        "architecture": model.config(),
        "eval_only": model.eval_only,
        "frozen": model.frozen_params,
        "optimizer": opt_info,
        "user": metadata,
    }
    try:
        header = json.dumps(meta)
    except TypeError as e:
        raise TypeError(f"save: metadata must be JSON-serializable ({e})") from None
    # GPU arrays are copied to the host: a file saved on either device loads on either
    host = {k: np.asarray(to_host(v), order="C") for k, v in tensors.items()}
    data = _st_save(host, metadata={"bnnet": header})
    atomic_write(path, data)


@dataclass
class Checkpoint:
    model: Sequential
    metadata: dict = field(default_factory=dict)  # the user's **metadata given to save()
    optimizer_info: dict | None = None  # type, step t, hyperparameters; None if no optimizer was saved
    optimizer_arrays: dict = field(default_factory=dict)  # "<param>/<state>" -> array
    extra_arrays: dict = field(default_factory=dict)  # "<name>" -> array (save's extra_arrays)


MAX_HEADER_BYTES = 100 << 20  # the limit safetensors itself sets on a header
# sizes that are dimensions of a layer's tensors
FEATURE_FIELDS = ("in_features", "out_features", "num_features", "in_channels", "out_channels")


def _read(path):
    """(arrays, meta) of a bnnet checkpoint file; CheckpointError for anything else.

    Nothing is allocated from what the metadata claims: the header is parsed and
    checked field by field (`_check_meta`), and each layer's sizes are checked
    against the shapes of the tensors the file actually holds, before the arrays
    are read or a layer is built.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e.strerror})") from None
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or n > len(data) - 8 or n > MAX_HEADER_BYTES:
            raise ValueError("header length exceeds the file size (truncated or not safetensors)")
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header["__metadata__"]["bnnet"])
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError("not a bnnet checkpoint")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(
            f"{path}: not a valid bnnet checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            "it may be truncated, corrupted or another program's file"
        ) from None
    shapes = {k: v.get("shape") if isinstance(v, dict) else None for k, v in header.items() if k != "__metadata__"}
    _check_meta(path, meta, shapes)
    try:
        arrays = _st_load(data)
    except (SafetensorError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"{path}: not a valid bnnet checkpoint, its tensors cannot be read ({e}); "
            "it may be truncated, corrupted or another program's file"
        ) from None
    return arrays, meta


def field_error(path, field, expected, value):
    """The CheckpointError for one metadata field: "<path>: metadata field <field> must be <expected>,
    got <value>" (the value's repr, cut at 80 characters)."""
    text = repr(value)
    return CheckpointError(
        f"{path}: metadata field {field} must be {expected}, got {text if len(text) <= 80 else text[:77] + '...'}"
    )


def _check_meta(path, meta, shapes):
    """Check the metadata's schema, one field at a time, and the architecture against the tensor shapes."""

    def bad(field, expected, value):
        raise field_error(path, field, expected, value)

    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        bad("format_version", "an integer >= 1", version)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer bnnet (format {version}); upgrade bnnet")
    for key, kind, expected in (
        ("bnnet_version", str, "a string"),
        ("eval_only", bool, "true or false"),
        ("user", dict, "an object"),
    ):
        if key in meta and not isinstance(meta[key], kind):
            bad(key, expected, meta[key])
    frozen = meta.get("frozen", [])
    if not isinstance(frozen, list) or not all(isinstance(n, str) and n in _param_names(shapes) for n in frozen):
        bad("frozen", "a list of the names of parameters the file holds", frozen)
    architecture = meta.get("architecture")
    if not isinstance(architecture, list) or not architecture:
        bad("architecture", "a non-empty list of layer configurations", architecture)
    for key, shape in shapes.items():
        if key.partition("/")[0] not in ("params", "buffers", "optimizer", "extra"):
            raise CheckpointError(
                f"{path}: unexpected tensor {key!r}; expected params/, buffers/, optimizer/ or extra/ names"
            )
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {key!r} has no valid shape in the header ({shape!r})")
    for i, cfg in enumerate(architecture):
        field = f"architecture[{i}]"
        if not isinstance(cfg, dict) or not isinstance(cfg.get("type"), str) or cfg["type"] not in LAYER_TYPES:
            bad(
                f"{field}.type",
                f"one of {', '.join(sorted(LAYER_TYPES))}",
                cfg.get("type") if isinstance(cfg, dict) else cfg,
            )
        for key, value in cfg.items():
            if isinstance(value, list):  # a kernel size, stride or padding: (height, width)
                if not 1 <= len(value) <= 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                    bad(f"{field}.{key}", "a list of 1 or 2 integers", value)
            elif value is not None and (isinstance(value, dict) or not isinstance(value, (bool, int, float, str))):
                bad(f"{field}.{key}", "a number, string, boolean or null", value)
        # A layer's sizes are dimensions of its own tensors: refuse sizes the file's tensors do not
        # have, before building the layer allocates them.
        dims = {
            d
            for key, shape in shapes.items()
            if key.partition("/")[0] != "extra" and key.split("/")[1].partition(".")[0] == str(i)
            for d in shape
        }
        kernel = cfg.get("kernel_size")
        kernel = kernel if isinstance(kernel, list) else [kernel]  # an int, or (height, width)
        if dims and "kernel_size" in cfg and not all(isinstance(k, int) and k in dims for k in kernel):
            raise CheckpointError(
                f"{path}: metadata field {field}.kernel_size = {cfg['kernel_size']!r} does not "
                f"match the file's tensors for layer {i} (their dimensions: {sorted(dims)})"
            )
        if not dims:  # a layer without tensors (a BatchNorm with affine=False, track_running_stats=False) is
            dims = {d for shape in shapes.values() for d in shape}  # as wide as some neighbour's tensor
        for key in FEATURE_FIELDS:
            if key in cfg and (isinstance(cfg[key], bool) or not isinstance(cfg[key], int)):
                bad(f"{field}.{key}", "an integer", cfg[key])
            if key in cfg and not dims and isinstance(cfg[key], int) and 1 <= cfg[key] <= 1 << 16:
                continue  # no tensor in the whole file to compare with: a small size builds nothing large
            if key in cfg and cfg[key] not in dims:
                raise CheckpointError(
                    f"{path}: metadata field {field}.{key} = {cfg[key]!r} does not match the "
                    f"file's tensors for layer {i} (their dimensions: {sorted(dims)})"
                )
    opt = meta.get("optimizer")
    if opt is not None:
        from .optim import OPTIMIZERS, optimizer_from_info

        names = sorted(cls.__name__ for cls in OPTIMIZERS.values())
        if not isinstance(opt, dict):
            bad("optimizer", "an object or null", opt)
        if opt.get("type") not in names:
            bad("optimizer.type", f"one of {', '.join(names)}", opt.get("type"))
        t = opt.get("t")
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            bad("optimizer.t", "an integer >= 0", t)
        try:  # the hyperparameters are checked by the optimizer's own constructor
            optimizer_from_info(opt)
        except (BnnetError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: metadata field optimizer is invalid ({e})") from None


def _param_names(shapes):
    """The dotted parameter names of a file's params/ tensors."""
    return {k.partition("/")[2] for k in shapes if k.startswith("params/")}


def _build(path, architecture):
    try:
        layers = [LAYER_TYPES[cfg["type"]](**{k: v for k, v in cfg.items() if k != "type"}) for cfg in architecture]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the architecture ({e})") from None
    with warnings.catch_warnings():  # the user was warned about a bias before BN when building it
        warnings.simplefilter("ignore")
        try:
            return Sequential(*layers)
        except HyperparameterError as e:  # e.g. layers that do not chain
            raise CheckpointError(f"{path}: the architecture is not a valid model ({e})") from None


def fill_model(model, arrays, source):
    """Copy params/ and buffers/ arrays into model in place; CheckpointError listing every mismatch."""
    problems = []
    for kind, view in (("params", model.params), ("buffers", model.buffers)):
        expected = dict(view.items())
        found = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(kind + "/")}
        for k in sorted(expected.keys() - found.keys()):
            problems.append(f"missing {kind} {k} {expected[k].shape}")
        for k in sorted(found.keys() - expected.keys()):
            problems.append(f"unexpected {kind} {k} {found[k].shape}")
        for k in sorted(expected.keys() & found.keys()):
            if found[k].shape != expected[k].shape:
                problems.append(f"{kind} {k}: checkpoint {found[k].shape}, model {expected[k].shape}")
            elif found[k].dtype != expected[k].dtype:
                problems.append(f"{kind} {k}: checkpoint {found[k].dtype}, model {expected[k].dtype}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    for k, v in arrays.items():
        kind, _, name = k.partition("/")
        if kind in ("params", "buffers"):
            getattr(model, kind)[name] = v


def load_checkpoint(path):
    """Everything in a checkpoint: a Checkpoint(model, metadata, optimizer_info, optimizer_arrays)."""
    arrays, meta = _read(path)
    model = _build(path, meta.get("architecture", []))
    model.eval_only = bool(meta.get("eval_only", False))
    fill_model(model, arrays, path)
    if meta.get("frozen"):  # (checked against the file's parameter names by _check_meta)
        model.freeze(*meta["frozen"])
    opt_arrays = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("optimizer/")}
    _check_optimizer_arrays(path, model, meta.get("optimizer"), opt_arrays)
    extra = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("extra/")}
    return Checkpoint(model, meta.get("user", {}), meta.get("optimizer"), opt_arrays, extra)


def _check_optimizer_arrays(path, model, info, arrays):
    """Each optimizer/<param>/<state> array must belong to a parameter, a state of the saved
    optimizer's type, and have that parameter's shape and dtype."""
    from .optim import OPTIMIZERS

    if info is None:
        if arrays:
            raise CheckpointError(f"{path}: holds optimizer tensors but no optimizer metadata")
        return
    cls = next(cls for cls in OPTIMIZERS.values() if cls.__name__ == info["type"])
    for key, value in arrays.items():
        name, _, state = key.rpartition("/")
        if name not in model.params or state not in cls.state_names + cls.counter_names:
            raise CheckpointError(
                f"{path}: unexpected optimizer tensor {key!r} for {info['type']} (its states: "
                f"{', '.join(cls.state_names + cls.counter_names) or 'none'})"
            )
        p = model.params[name]
        if state in cls.counter_names:  # a per-parameter update count
            if value.shape != () or value.dtype.kind not in "iu" or value < 0:
                raise CheckpointError(
                    f"{path}: optimizer tensor {key!r} must be a non-negative integer scalar, "
                    f"got {value.dtype} {value.shape}"
                )
        elif value.shape != p.shape or value.dtype != p.dtype:
            raise CheckpointError(
                f"{path}: optimizer tensor {key!r} is {value.dtype} {value.shape}; "
                f"parameter {name} is {p.dtype} {p.shape}"
            )


def load(path, optimizer=None):
    """Load the model saved at `path`; with `optimizer`, also restore its state into it.

    The file is parsed as safetensors (raw arrays and JSON): nothing in it is
    ever executed. Raises CheckpointError for a missing, truncated, foreign or
    mismatched file.
    """
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise HyperparameterError(
            f"load: optimizer must be None or a bnnet.optim Optimizer to restore the saved state into, "
            f"got {optimizer!r}"
        )
    ckpt = load_checkpoint(path)
    if optimizer is not None:
        if ckpt.optimizer_info is None:
            raise CheckpointError(f"{path}: holds no optimizer state; save it with bnnet.save(path, model, optimizer)")
        optimizer.load_state_dict(ckpt.optimizer_arrays, ckpt.optimizer_info)
    ckpt.model.metadata = ckpt.metadata
    return ckpt.model
