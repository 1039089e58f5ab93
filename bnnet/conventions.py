"""Converting the running-average weight between bnnet, PyTorch and Keras.

bnnet's `decay` is the weight kept by the old running value:
    running = decay * running + (1 - decay) * batch
Keras' BatchNormalization(momentum=...) means the same thing, so they are equal;
PyTorch's BatchNorm1d(momentum=...) is the weight of the NEW batch: 1 - decay.
PyTorch's momentum=None (cumulative average) is bnnet's decay=None.
"""

from ._checks import check_number


def _fraction(owner, name, value):
    return None if value is None else check_number(owner, name, value, low=0, high=1)


def decay_from_torch_momentum(momentum):
    """bnnet decay for torch.nn.BatchNorm1d(momentum=momentum): 1 - momentum (None stays None)."""
    m = _fraction("decay_from_torch_momentum", "momentum", momentum)
    return None if m is None else 1.0 - m


def torch_momentum_from_decay(decay):
    """torch.nn.BatchNorm1d momentum for bnnet's decay: 1 - decay (None stays None)."""
    d = _fraction("torch_momentum_from_decay", "decay", decay)
    return None if d is None else 1.0 - d


def decay_from_keras_momentum(momentum):
    """bnnet decay for keras.layers.BatchNormalization(momentum=momentum): the same number."""
    return _fraction("decay_from_keras_momentum", "momentum", momentum)


def keras_momentum_from_decay(decay):
    """keras.layers.BatchNormalization momentum for bnnet's decay: the same number."""
    return _fraction("keras_momentum_from_decay", "decay", decay)
