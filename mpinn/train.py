"""The training loop: batch -> local gradient -> Allreduce -> the same update on every replica.

    mpirun -n 8 python -m mpinn train --data train.h5 --val-data test.h5 --hidden 512,512 \\
        --epochs 10 --run-dir runs/a
    mpirun -n 8 python -m mpinn train --pipeline-stages 2 --micro-batches 8 ...   # 2 stages x 4
    srun --mpi=pmi2 python -m mpinn train ...         (inside a SLURM allocation)
    python -m mpinn train                               (1 rank, bundled digits data)

startup.assemble builds the run's parts from its options (engine, batch source, hooks, run folder)
and hands them to the Trainer (trainer.py), which reads no options.
"""
from .errors import AgreedExit
from .log import Log
from .startup import assemble


def run(cfg, explicit, comm, user_hooks=(), quiet=False):
    """`mpinn train`: assemble (data, network, engine, hooks), train epoch by epoch, summarize.
    user_hooks (mpinn.fit's) join the run's own; quiet: nothing on stdout (mpinn.fit's default;
    warnings and errors still go to stderr)."""
    options = cfg.sections()
    log = Log(comm.rank, comm.size, quiet=quiet, progress=options.run.progress)
    trainer = assemble(options, explicit, comm, log, user_hooks)
    try:
        try:
            trainer.train()
        finally:  # also when training ends with an error: handlers back, watchdog thread gone
            trainer.release()
        trainer.end()
    except AgreedExit:
        # an error every rank agreed on (divergence, a signal, a failed checkpoint): the hooks
        # undo what must not outlive a failed run (an --overwrite with no checkpoint yet gives
        # the old run back), and the engine's shared window and communicators are released (a
        # sweep's next trial runs in these processes). Any other exception ends the job (MPI
        # Abort), where a collective release could hang.
        trainer.call("on_failure")
        trainer.engine.close()
        raise
    return trainer
