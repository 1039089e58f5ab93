"""Training curves for TensorBoard: `fit(..., log_dir=DIR)` (CLI: `bnnet train --log-dir DIR`).

Event files are written through tensorboardX (the optional `[tensorboard]` extra) and
read by TensorBoard (`tensorboard --logdir DIR`). After every epoch, with the epoch as
the step:

    epoch/loss, epoch/accuracy          the epoch's mean over its mini-batches (train mode)
    epoch/val_loss, epoch/val_accuracy  the validation data in eval mode, when given
    epoch/lr                            the learning rate of the next update (the schedule's)
    grad_norm/<param>                   the L2 norm of each parameter's gradient at the epoch's last step
    bn/<layer>/running_mean, .../running_var
                                        mean over features of each BatchNorm's running statistics

Values equal the history `fit` returns (tests/test_tensorboard.py reads them back).
"""

import numpy as np

from .errors import BnnetError
from .layers import BatchNorm


class TensorBoardLog:
    """One tensorboardX SummaryWriter for a run; `epoch` after each epoch, `close` at the end."""

    def __init__(self, log_dir):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise BnnetError(
                "log_dir: TensorBoard files are written with tensorboardX, which is not installed: "
                'in bnnet\'s checkout, pip install ".[tensorboard]"'
            ) from None
        self.writer = SummaryWriter(str(log_dir))

    def epoch(self, history, model, optimizer):
        epoch = history["epoch"][-1]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            values = history.get(key)
            if values and values[-1] is not None:
                self.writer.add_scalar(f"epoch/{key}", float(values[-1]), epoch)
        self.writer.add_scalar("epoch/lr", float(optimizer.current_lr()), epoch)
        for name, _, grad in model.named_parameters():
            if grad is not None:
                self.writer.add_scalar(f"grad_norm/{name}", float(np.linalg.norm(grad.astype(np.float64))), epoch)
        for i, layer in enumerate(model.layers):
            if isinstance(layer, BatchNorm) and layer.track_running_stats:
                for key in ("running_mean", "running_var"):
                    self.writer.add_scalar(f"bn/{i}/{key}", float(layer.buffers[key].astype(np.float64).mean()), epoch)
        self.writer.flush()

    def close(self):
        self.writer.close()
