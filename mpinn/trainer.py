"""The Trainer: steps over epochs of batches and tells its hooks. It reads no options: its engine,
batch source (data.BatchSource), hooks (hooks.py) and run folder (rundir.RunDir) come ready-made
from the assembly (startup.assemble).

Each data-parallel reader (a rank, or a pipeline replica) reads only its part of every global
batch (plan.BatchPlan); its gradient is of (sum of its rows' losses) / (global batch rows), so the
Allreduce SUM is exactly the gradient of the global mean loss. Every rank runs the same number of
steps by construction.
"""
import time
from dataclasses import dataclass

from .hooks import Hook, raise_run
from .runtime.process import seconds_since_process_start


EVENTS = ("on_train_begin", "on_loop_start", "on_step_end", "on_epoch_end", "after_epoch",
          "on_train_end", "on_summary", "on_failure")


def acts_on(hook, event):
    """Whether a hook does something at this event (not Hook's empty method, if it is a Hook)."""
    method = getattr(type(hook), event, None)
    return method is not None and method is not getattr(Hook, event)


@dataclass
class LoopState:
    """Where the loop is, what hooks read and set: the step (optimizer updates made, counting a
    resumed run's), the epoch and batch, and whether and why training stops."""
    step: int
    start_step: int
    total_steps: int
    steps_per_epoch: int
    epochs: int
    epoch: int = 0
    batch: int = 0
    stopping: bool = False     # a signal reached some rank: every rank stops after this step
    finished: str = ""         # why training ended before its last step (early stopping)
    last_saved: int = None     # the step of the last checkpoint written (None: none yet)
    skipped: int = 0           # updates not applied (non-finite, --on-nonfinite skip)
    last_train_loss: float = None
    last_validation: dict = None
    trained_samples: int = 0
    train_seconds: float = 0.0
    startup_s: float = 0.0


@dataclass
class Guard:
    """What watches the loop: the stop request (signals), the stall watchdog, injected faults."""
    stop: object
    watchdog: object
    faults: object


class Trainer:
    """Steps over epochs of batches and tells the hooks. It takes its parts ready-made."""

    def __init__(self, engine, batches, hooks, run_dir, *, comm, log, state, guard):
        self.engine, self.batches, self.hooks, self.run_dir = engine, batches, hooks, run_dir
        self.comm, self.log, self.state, self.guard = comm, log, state, guard
        self.arch = engine.arch
        engine.watchdog = guard.watchdog
        for hook in hooks:
            hook.trainer = self
        # each event's listeners, found once: a step calls only the hooks that act on it
        self.listeners = {event: [getattr(h, event) for h in hooks if acts_on(h, event)]
                          for event in EVENTS}

    def call(self, event, *args):
        for listener in self.listeners[event]:
            listener(self.state, *args)

    def train(self):
        """Epochs of steps; after each whole epoch, the hooks (validation, checkpoint)."""
        st = self.state
        self.call("on_train_begin")
        self.comm.barrier()  # a shared clock origin for the timeline and the first window
        self.engine.timeline.start()
        st.startup_s = seconds_since_process_start()
        self.call("on_loop_start")
        while st.step < st.total_steps and not st.stopping and not st.finished:
            st.epoch, first = divmod(st.step, st.steps_per_epoch)
            batches = self.batches.epoch(st.epoch)
            self.step_weights = self.weights_of_steps(batches)
            try:
                for k in range(first, st.steps_per_epoch):
                    if st.step >= st.total_steps or st.stopping:
                        break
                    self.train_step(batches, k)
            finally:
                batches.close()
            if st.step % st.steps_per_epoch == 0 and not st.stopping:
                record = {"kind": "epoch", "epoch": st.epoch + 1, "step": st.step}
                st.last_validation = record
                self.call("on_epoch_end", record)
                self.call("after_epoch")
        self.call("on_train_end")
        if st.stopping:
            stop = self.guard.stop
            what = stop.name if stop.requested else "a signal on another rank"
            self.comm.checked(raise_run, f"stopped by {what} after step {st.step}: final "
                                         f"checkpoint {self.run_dir.checkpoint} written; "
                                         "continue with --resume",
                              stop.exit_code() if stop.requested else 143)

    def train_step(self, batches, k):
        """Global batch k: this rank's part, one engine step, then the hooks."""
        st, engine, guard = self.state, self.engine, self.guard
        st.batch = k
        guard.watchdog.begin(st.step + 1)
        guard.faults.at("step", st.step + 1, engine)
        t0 = time.perf_counter()
        xb, yb = batches(k)
        xb = guard.faults.batch(st.step + 1, xb)
        engine.timeline.add("data", t0, time.perf_counter())
        weights = self.step_weights
        total = self.batches.global_rows(k) if weights is None else weights[1][k]
        # a batch whose rows all weigh 0 adds nothing (rather than 0 / 0)
        scale = self.arch.loss_fn.scale(total, self.arch.sizes[-1]) if total > 0 else 0.0
        res = engine.step(xb, yb, int(self.batches.counts[k]), scale, guard.stop.requested,
                          batches.rows_of(k), batches.weights_of(k))
        if weights is not None:
            res.weight = weights[0][k]
        guard.watchdog.end()
        st.step += 1
        self.call("on_step_end", res)
        st.stopping = res.stop  # every rank sees the same flag after the same step

    def weights_of_steps(self, batches):
        """(this rank's, all ranks') sums of the row weights (the class's times the row's own) of
        each step of the epoch, or None for unweighted rows: one small Allreduce an epoch, not
        one a step."""
        loss = self.arch.loss_fn
        if not (loss.weighted or self.batches.own_weights):
            return None
        local = batches.step_sums(loss.row_weights)
        return local, self.comm.allreduce_sum(local)

    def release(self):
        self.guard.stop.restore()
        self.guard.watchdog.stop()
        self.run_dir.release()

    def end(self):
        """After the loop: the summary hooks, then the engine's and the log's resources."""
        self.call("on_summary")
        self.engine.close()
        self.log.close()

    def outcome(self):
        """The run's final figures, the same on every rank (a sweep records them)."""
        st = self.state
        val = st.last_validation or {}
        metrics = {k: v for k, v in val.items()  # --metrics' headline figures (val_f1, ...)
                   if k.startswith("val_") and k not in ("val_loss", "val_accuracy", "val_metrics")}
        return {"val_loss": val.get("val_loss"), "val_accuracy": val.get("val_accuracy"),
                **metrics, "train_loss": st.last_train_loss,
                "epochs": st.step // st.steps_per_epoch, "steps": st.step}
