"""Checkpoints: one safetensors file of named arrays plus JSON metadata. No pickle anywhere.

Layout of the arrays:
    params/<dotted name>       e.g. params/0.W, params/1.gamma
    buffers/<dotted name>      e.g. buffers/1.running_mean, buffers/1.count
    optimizer/<param>/<state>  e.g. optimizer/0.W/m      (only when an optimizer is saved)
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

from .errors import CheckpointError, HyperparameterError
from .layers import LAYER_TYPES
from .model import Sequential

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


def save(path, model, optimizer=None, **metadata):
    """Save model parameters and buffers (and optimizer state) to one .safetensors file, atomically.

    Args:
        path: file to write (its folder is created).
        model: a Sequential.
        optimizer: optional Optimizer whose state (moments, step counter) is stored too.
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
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "bnnet_version": __version__,
            "architecture": model.config(), "eval_only": model.eval_only, "optimizer": opt_info, "user": metadata}
    try:
        header = json.dumps(meta)
    except TypeError as e:
        raise TypeError(f"save: metadata must be JSON-serializable ({e})") from None
    data = _st_save({k: np.asarray(v, order="C") for k, v in tensors.items()}, metadata={"bnnet": header})
    atomic_write(path, data)


@dataclass
class Checkpoint:
    model: Sequential
    metadata: dict = field(default_factory=dict)  # the user's **metadata given to save()
    optimizer_info: dict | None = None  # type, step t, hyperparameters; None if no optimizer was saved
    optimizer_arrays: dict = field(default_factory=dict)  # "<param>/<state>" -> array


def _read(path):
    """(arrays, meta) of a bnnet checkpoint file; CheckpointError for anything else."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e.strerror})") from None
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or n > len(data) - 8:
            raise ValueError("header length exceeds the file size (truncated or not safetensors)")
        header = json.loads(data[8:8 + n])
        meta = json.loads(header["__metadata__"]["bnnet"])
        if meta.get("format") != FORMAT:
            raise ValueError("not a bnnet checkpoint")
        arrays = _st_load(data)
    except (ValueError, KeyError, TypeError, SafetensorError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid bnnet checkpoint ({e}); "
                              "it may be truncated, corrupted or another program's file") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer bnnet (format {meta['format_version']}); upgrade bnnet")
    return arrays, meta


def _build(path, architecture):
    try:
        layers = [LAYER_TYPES[cfg["type"]](**{k: v for k, v in cfg.items() if k != "type"}) for cfg in architecture]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the architecture ({e!r})") from None
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
        expected = {k: v.shape for k, v in view.items()}
        found = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(kind + "/")}
        for k in sorted(expected.keys() - found.keys()):
            problems.append(f"missing {kind} {k} {expected[k]}")
        for k in sorted(found.keys() - expected.keys()):
            problems.append(f"unexpected {kind} {k} {found[k].shape}")
        for k in sorted(expected.keys() & found.keys()):
            if found[k].shape != expected[k]:
                problems.append(f"{kind} {k}: checkpoint {found[k].shape}, model {expected[k]}")
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
    opt_arrays = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("optimizer/")}
    return Checkpoint(model, meta.get("user", {}), meta.get("optimizer"), opt_arrays)


def load(path, optimizer=None):
    """Load the model saved at `path`; with `optimizer`, also restore its state into it.

    The file is parsed as safetensors (raw arrays and JSON): nothing in it is
    ever executed. Raises CheckpointError for a missing, truncated, foreign or
    mismatched file.
    """
    ckpt = load_checkpoint(path)
    if optimizer is not None:
        if ckpt.optimizer_info is None:
            raise CheckpointError(f"{path}: holds no optimizer state; save it with bnnet.save(path, model, optimizer)")
        optimizer.load_state_dict(ckpt.optimizer_arrays, ckpt.optimizer_info)
    ckpt.model.metadata = ckpt.metadata
    return ckpt.model
