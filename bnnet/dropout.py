"""Dropout: in training, zero each value with probability p and scale the rest by 1 / (1 - p).

    model = bnnet.Sequential(Linear(784, 100), BatchNorm(100), ReLU(), Dropout(0.2), Linear(100, 10))

Next to Batch Norm it changes the variance BN sees between training and evaluation (the "variance
shift"); placing Dropout after the last BatchNorm, as above, is the usual remedy.
"""

import numpy as np

from ._checks import check_number, check_seed
from .device import device_of, to_device, to_host
from .layers import LAYER_TYPES, Layer


class Dropout(Layer):
    """Inverted dropout, as torch.nn.Dropout:

        train:  m_i ~ Bernoulli(1 - p),  y = x * m / (1 - p)      (a new mask every forward)
        eval:   y = x

    Args:
        p: the probability of zeroing a value, in [0, 1) (default 0.5).
        seed: seeds the masks (default None: a random seed).
    Buffers: rng (2,) int64: the seed and the number of masks drawn so far. Each mask is drawn from a
        Philox generator keyed by both, so a checkpoint holds the mask sequence and a resumed run
        draws the same masks as an uninterrupted one.
    Any input shape; the mask has the shape of x.
    """

    _masked = False  # whether the last forward applied a mask (train mode with p > 0)

    def __init__(self, p=0.5, seed=None):
        super().__init__()
        self.p = check_number("Dropout", "p", p, low=0, high=1, high_open=True)
        seed = check_seed("Dropout", seed)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (1 << 63))
        self.buffers["rng"] = np.array([seed, 0], np.int64)

    def state_spec(self):
        return {("buffers", "rng"): ((2,), np.int64)}

    def _forward(self, x, train, out=None):
        if not train or self.p == 0:  # the identity: no mask (nothing to move to x's device)
            self._cache, self._masked = (np.broadcast_to(np.ones((), x.dtype), x.shape),), False
            return x.copy()
        else:
            rng = self.buffers["rng"]
            seed, draws = (int(v) for v in to_host(rng))
            generator = np.random.Generator(np.random.Philox(key=[seed, draws]))
            keep = generator.random(x.shape, dtype=x.dtype) >= self.p
            rng[1] = draws + 1
            mask = to_device(keep * x.dtype.type(1.0 / (1.0 - self.p)), device_of(x))  # 0 or 1 / (1 - p)
        self._cache, self._masked = (mask,), True
        return x * mask

    def _backward(self, dy, input_grad, dx_out=None):
        (mask,) = self._cached()
        return dy * mask if self._masked else dy.copy()

    @property
    def mask(self):
        """The last forward's mask: 0 or 1 / (1 - p) per value (ones after an eval forward)."""
        return np.asarray(self._cached()[0])

    def config(self):
        return {"p": self.p}


LAYER_TYPES["Dropout"] = Dropout
