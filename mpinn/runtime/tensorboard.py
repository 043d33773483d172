"""--tensorboard DIR: the run's metrics as TensorBoard scalars, written by rank 0 through
tensorboardX (the optional `tensorboard` extra), the same records metrics.jsonl receives.

    train/loss, train/accuracy, train/samples_per_s, train/step_s, train/lr, train/grad_norm
                        every --log-every steps (what the log line says), at the optimizer step
    epoch/loss, epoch/accuracy, epoch/val_loss, epoch/val_accuracy (training means, validation)
                        after each epoch, at its last step
A resumed run purges what the stopped run wrote after its checkpoint's step, as metrics.jsonl
does (tensorboardX's purge_step), so curves never double back."""
from ..errors import UsageError

SKIPPED = ("kind", "epoch", "step", "samples")  # record keys that are coordinates or counts


def require_writer():
    """The SummaryWriter class, or a UsageError naming the extra to install."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs tensorboardX: pip install 'mpinn[tensorboard]' "
                         "(or pip install tensorboardX)") from None
    return SummaryWriter


class EventSink:
    """Scalars of metric records into DIR's event file; a record kind becomes a tag prefix."""

    def __init__(self, folder, purge_step=None):
        self.writer = require_writer()(logdir=folder, purge_step=purge_step)

    def __call__(self, record):
        kind = record.get("kind")
        if kind not in ("train", "epoch"):
            return
        for key, value in record.items():
            if key not in SKIPPED and isinstance(value, (int, float)) and not isinstance(
                    value, bool):
                self.writer.add_scalar(f"{kind}/{key}", value, record["step"])
        self.writer.flush()  # on disk now, as metrics.jsonl's line: a crash loses nothing

    def close(self):
        self.writer.close()
