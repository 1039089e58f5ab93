"""A model's parameters and gradients in one contiguous buffer per dtype.

The layers keep their dicts (`layer.params["W"]`, `model.params["0.W"]`, `state_dict`, checkpoints:
names and shapes unchanged); the arrays in them are views into the buffers laid out here:

    params  (P,)  every parameter of one dtype, weights ("W") first, then the rest in model order
    grads   (P,)  the same layout; a layer writes its gradient into its view (Layer._grad)

What the one buffer buys: an optimizer updates every parameter of a dtype in one kernel call
(bnnet.optim), LastGood copies them in one pass (bnnet.train), and the data-parallel allreduce
sums every gradient without a copy (bnnet.distributed, which asks for a tail of extra values after
the gradients).

Views stay views: `model.params[k] = value` copies into the view, and so do `bnnet.load` and
`set_state`. An entry replaced by another array (`layer.params["W"] = np.zeros(...)`) is noticed
by `current()` (one identity test per parameter) and the model lays its parameters out again
around the new values (Sequential.flat_layout). A gradient view is handed to the layer at its
first backward, so that `grads` stays empty until then (an update before any backward is refused).
"""

from .device import empty, zeros


class Group:
    """The parameters of one dtype: flat `params` and `grads` (P,) and where each one sits.

    entries: [(dotted name, layer, key, start, stop)], in layout order (weights first).
    """

    def __init__(self, entries, tail=0):
        first = entries[0][1].params[entries[0][2]]
        self.dtype = first.dtype
        self.size = sum(layer.params[key].size for _, layer, key in entries)
        self.params = empty(first, (self.size,), self.dtype)
        self.buffer = zeros(first, (self.size + tail,), self.dtype)  # the gradients, then `tail` extra values
        self.grads = self.buffer[: self.size]
        self.tail = tail
        self.entries, start = [], 0
        for name, layer, key in entries:
            p = layer.params[key]
            stop = start + p.size
            view = self.params[start:stop].reshape(p.shape)
            view[...] = p
            layer.params[key] = view
            self.entries.append((name, layer, key, start, stop))
            start = stop
        self._point_grads()

    def _point_grads(self):
        for _, layer, key, start, stop in self.entries:
            home = self.grads[start:stop].reshape(layer.params[key].shape)
            old = layer.grads.get(key)
            if getattr(old, "shape", None) == home.shape and getattr(old, "dtype", None) == home.dtype:
                home[...] = old  # a gradient computed before the layout: its values move into the view
                layer.grads[key] = home
            # (any other gradient stays as it is: the optimizer's per-parameter path then names it)
            layer._grad_homes[key] = home

    def with_tail(self, tail):
        """Make room for `tail` extra values after the gradients (kept when already there); returns them."""
        if tail > self.tail:
            old, old_homes = self.buffer, [layer._grad_homes[key] for _, layer, key, *_ in self.entries]
            self.buffer = zeros(old, (self.size + tail,), self.dtype)
            self.buffer[: self.size] = old[: self.size]
            self.grads, self.tail = self.buffer[: self.size], tail
            for (_, layer, key, start, stop), old_home in zip(self.entries, old_homes):
                home = layer._grad_homes[key] = self.grads[start:stop].reshape(old_home.shape)
                if layer.grads.get(key) is old_home:
                    layer.grads[key] = home
        return self.buffer[self.size : self.size + tail]

    def grads_ready(self):
        """Every gradient has been written into its view (each layer ran backward since the layout)."""
        return all(layer.grads.get(key) is layer._grad_homes.get(key) for _, layer, key, *_ in self.entries)

    def runs(self, values):
        """[(start, stop, value)]: the maximal runs of consecutive entries whose `values[name]` agree."""
        out = []
        for name, _, _, start, stop in self.entries:
            v = values[name]
            if out and out[-1][2] == v and out[-1][1] == start:
                out[-1] = (out[-1][0], stop, v)
            else:
                out.append((start, stop, v))
        return out


def can_lay_out(arrays, array_types):
    """Whether these parameters can live in flat buffers: float32/float64 arrays of the backend's type.
    (Anything else is left where it is, for the checks of the optimizer and the layers to name.)"""
    return all(isinstance(a, array_types) and a.dtype.char in "fd" for a in arrays)


class FlatLayout:
    """The flat buffers of one model: one Group per dtype (see the module docstring)."""

    def __init__(self, model):
        entries = [
            (name, model.layers[int(name.split(".", 1)[0])], name.split(".", 1)[1])
            for name, _, _ in model.named_parameters()
        ]
        entries.sort(key=lambda e: e[2] != "W")  # weights first (stable): the usual weight decay is one run
        by_dtype = {}
        for e in entries:
            by_dtype.setdefault(e[1].params[e[2]].dtype, []).append(e)
        self.groups = [Group(group) for group in by_dtype.values()]
        self.layers = tuple(model.layers)
        self._arrays = [(layer, key, layer.params[key]) for g in self.groups for _, layer, key, *_ in g.entries]
        self._count = sum(len(layer.params) for layer in self.layers)

    def current(self, layers):
        """True while `layers` are the layers laid out and each parameter is still the view this
        layout made (identity tests only)."""
        return (
            all(a is b for a, b in zip(layers, self.layers))
            and all(layer.params.get(key) is view for layer, key, view in self._arrays)
            and sum(len(layer.params) for layer in self.layers) == self._count
        )
