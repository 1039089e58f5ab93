"""Mutations of a valid checkpoint, for the fuzz tests (test_fuzz.py) and their subprocess worker."""

import json
import struct

import numpy as np

# Values a metadata field is replaced by: wrong types, wrong ranges, deep nesting, huge sizes.
ODD_VALUES = [
    None,
    True,
    False,
    -1,
    0,
    1,
    2,
    1.5,
    -0.0,
    1e308,
    10**30,
    20000,
    10**7,
    "abc",
    "",
    "2",
    [],
    {},
    [1, 2],
    {"a": 1},
    [[[[[]]]]],
    "float16",
    "NaN",
]


def split(data):
    """(header dict, tensor bytes) of a safetensors file."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header, body, raw_header=None):
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def paths(value, prefix=()):
    """Every path into a JSON value: tuples of keys/indices."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, prefix + (i,))


def replaced(value, path, new, delete=False):
    """A copy of a JSON value with the item at path replaced by new (or deleted)."""
    value = json.loads(json.dumps(value))
    if not path:
        return new
    parent = value
    for k in path[:-1]:
        parent = parent[k]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return value


def mutate_meta(data, path, new, delete=False):
    header, body = split(data)
    meta = json.loads(header["__metadata__"]["bnnet"])
    header["__metadata__"]["bnnet"] = json.dumps(replaced(meta, path, new, delete))
    return join(header, body)


def mutate_tensor_header(data, key, field, new):
    header, body = split(data)
    header[key][field] = new
    return join(header, body)


def deep_json(depth):
    return "[" * depth + "]" * depth


def meta_paths(data):
    header, _ = split(data)
    return [p for p in paths(json.loads(header["__metadata__"]["bnnet"])) if p]


def valid_model_checkpoint(path, with_fit=True):
    """A small model saved mid-run by fit (step 4 of 6: epochs=2, batch_size=8, seed=0 on the 24 rows
    returned) with its optimizer and resume state; with_fit=False, an untrained model alone."""
    import os
    import shutil

    import bnnet

    rng = np.random.default_rng(0)
    X = rng.standard_normal((24, 4)).astype(np.float32)
    y = np.arange(24) % 3
    model = bnnet.mlp([4, 5, 3], seed=0)
    if with_fit:
        steps = os.path.join(os.path.dirname(str(path)), "step-{step}.safetensors")
        bnnet.fit(
            model,
            X,
            y,
            epochs=2,
            batch_size=8,
            seed=0,
            progress=False,
            checkpoint=steps,
            checkpoint_every=2,
            checkpoint_metadata={"note": "fuzz"},
        )
        shutil.copy(steps.format(step=4), path)
    else:
        bnnet.save(path, model, note="fuzz")
    return X, y
