"""A model's summary: per layer its output shape, parameter and buffer counts, what is frozen, bytes.

    print(model.summary((1, 28, 28)))       # or model.summary() where the first layer fixes the shape

Shapes are per sample, with N for the batch; a size the layers leave open (a convnet's image size
when no input shape is given) reads "?".
"""

from dataclasses import dataclass

from .engine import check_chain
from .errors import InputError


@dataclass
class LayerRow:
    index: int
    name: str  # the layer's type, and its main size (e.g. "Linear(784, 100)")
    output_shape: tuple | None  # per sample; None where unknown
    params: int  # parameter values
    trainable: int  # of which not frozen
    buffers: int  # buffer values (running statistics, counters, RNG state)
    bytes: int  # parameters and buffers


class ModelSummary:
    """The table of Sequential.summary(); str() (or print) shows it, `rows` holds the numbers."""

    def __init__(self, rows, input_shape):
        self.rows, self.input_shape = rows, input_shape
        self.total_params = sum(r.params for r in rows)
        self.trainable_params = sum(r.trainable for r in rows)
        self.total_buffers = sum(r.buffers for r in rows)
        self.total_bytes = sum(r.bytes for r in rows)

    def __str__(self):
        header = ("#", "layer", "output shape", "params", "trainable", "buffers")
        body = [
            (str(r.index), r.name, _shape(r.output_shape), f"{r.params:,}", f"{r.trainable:,}", f"{r.buffers:,}")
            for r in self.rows
        ]
        widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]

        def line(row):
            cells = [row[c].ljust(widths[c]) if c < 3 else row[c].rjust(widths[c]) for c in range(len(row))]
            return "  ".join(cells).rstrip()

        rule = "-" * len(line(header))
        frozen = self.total_params - self.trainable_params
        return "\n".join(
            [
                f"input: {_shape(self.input_shape)}",
                line(header),
                rule,
                *(line(row) for row in body),
                rule,
                f"parameters: {self.total_params:,} ({self.trainable_params:,} trainable, {frozen:,} frozen)",
                f"buffers: {self.total_buffers:,}",
                f"memory: {_size(self.total_bytes)} (parameters and buffers)",
            ]
        )

    __repr__ = __str__


def summarize(model, input_shape=None):
    """The ModelSummary of `model` for per-sample `input_shape` (default: what the first layers imply)."""
    if input_shape is not None:
        if not isinstance(input_shape, (tuple, list)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape
        ):
            raise InputError(f"summary: input_shape must be a tuple of sizes >= 1 (one sample), got {input_shape!r}")
        input_shape = tuple(input_shape)
    shapes = check_chain(model.layers, input_shape, error=InputError)
    rows = []
    for i, (layer, (_, out)) in enumerate(zip(model.layers, shapes)):
        params = sum(int(a.size) for a in layer.params.values())
        trainable = sum(int(a.size) for k, a in layer.params.items() if k not in layer.frozen_params)
        buffers = sum(int(a.size) for a in layer.buffers.values())
        size = sum(int(a.nbytes) for d in (layer.params, layer.buffers) for a in d.values())
        rows.append(LayerRow(i, _describe(layer), out, params, trainable, buffers, size))
    return ModelSummary(rows, input_shape or (shapes[0][0] if shapes else None))


def _describe(layer):
    name = type(layer).__name__
    sizes = [getattr(layer, k) for k in ("in_features", "in_channels") if hasattr(layer, k)]
    sizes += [getattr(layer, k) for k in ("out_features", "out_channels") if hasattr(layer, k)]
    if not sizes and hasattr(layer, "num_features"):
        sizes = [layer.num_features]
    if name == "GroupNorm":
        sizes = [layer.num_groups, layer.num_features]
    if hasattr(layer, "p") and name == "Dropout":
        sizes = [layer.p]
    return f"{name}({', '.join(str(s) for s in sizes)})" if sizes else name


def _shape(shape):
    if shape is None:
        return "?"
    return "(" + ", ".join(["N", *("?" if d is None else str(d) for d in shape)]) + ")"


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"
