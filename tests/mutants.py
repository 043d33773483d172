"""`make test-mutants`: does the suite catch real bugs? Each mutant is a one-line bug of real risk,
applied alone to a scratch copy of the project; the tests named for it run against that copy
(`python -m pytest` there, so `import mpinn` and every `mpiexec ... -m mpinn` child load the
mutated code). A mutant is caught when those tests fail. The same tests must pass unmutated first.
Prints a table; exits 1 when any mutant survives, 2 when the unmutated baseline fails.

    python tests/mutants.py [NAME ...]     (default: all; names as in the table)
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH_3_RANKS = ["tests/test_torch_reference.py", "-k", "3 and ranks and ce and sgd"]

# (name, file, text, replacement, tests)
MUTANTS = [
    ("gradient 1/N: local rows instead of the global batch", "mpinn/trainer.py",
     "total = self.batches.global_rows(k) if weights is None else weights[1][k]",
     "total = int(self.batches.counts[k]) if weights is None else weights[1][k]", TORCH_3_RANKS),
    ("row split: a rank's part one row too long", "mpinn/plan.py",
     "base + (1 if i < extra else 0)", "base + (1 if i <= extra else 0)",
     ["tests/test_data.py"]),
    ("short last batch dropped from the epoch", "mpinn/plan.py",
     "return -(-self.n_rows // self.batch)", "return self.n_rows // self.batch",
     ["tests/test_data.py"]),
    ("Adam bias correction one step ahead", "mpinn/optim.py",
     "bias1 = f(1 - self.beta1 ** self.t)", "bias1 = f(1 - self.beta1 ** (self.t + 1))",
     ["tests/test_optim.py"]),
    ("momentum dampened", "mpinn/optim.py",
     "v = mu * velocity[i] + grads[i]", "v = mu * velocity[i] + (1 - mu) * grads[i]",
     ["tests/test_optim.py"]),
    ("Nesterov step without the gradient", "mpinn/optim.py",
     "params[i] -= lr * (g + mu * v)", "params[i] -= lr * (mu * v)", ["tests/test_optim.py"]),
    ("weight decay with the wrong sign (SGD)", "mpinn/optim.py",
     "params[i] -= lr * (grads[i] + weight_decay * params[i])",
     "params[i] -= lr * (grads[i] - weight_decay * params[i])", ["tests/test_optim.py"]),
    ("softmax without the max-shift", "mpinn/kernels.py",
     "logits[i, j] = np.exp(logits[i, j] - m)", "logits[i, j] = np.exp(logits[i, j])",
     ["tests/test_kernels.py"]),
    ("cross-entropy normaliser without the max-shift", "mpinn/kernels.py",
     "s += np.exp(logits[i, j] - m)", "s += np.exp(logits[i, j])", ["tests/test_kernels.py"]),
    ("tanh derivative", "mpinn/kernels.py", "d[i, j] *= 1 - v * v", "d[i, j] *= 1 - v",
     ["tests/test_kernels.py"]),
    ("mse gradient loses its factor 2", "mpinn/kernels.py", "out[i, j] = 2 * e * scale",
     "out[i, j] = e * scale",
     ["tests/test_kernels.py"]),
    ("bias gradient keeps only the last row", "mpinn/kernels.py", "gb[j] += d[i, j]",
     "gb[j] = d[i, j]", ["tests/test_kernels.py"]),
    ("hidden bias gradient keeps only the last row", "mpinn/kernels.py", "s += dT[j, i]",
     "s = dT[j, i]", ["tests/test_kernels.py"]),
    ("hidden relu layer without its bias", "mpinn/kernels.py", "v = zT[j, i] + bj", "v = zT[j, i]",
     ["tests/test_kernels.py"]),
    ("gradient bound ignores the layer input", "mpinn/kernels.py",
     "_raise_bound_(bound, n, _max_abs(hT), _max_abs(d))",
     "_raise_bound_(bound, n, 1.0, _max_abs(d))",
     ["tests/test_gradient_bound.py"]),
    ("gradient Allreduce (--allreduce mpi) takes the max", "mpinn/comm/collectives.py",
     'mpi_op = {"sum": MPI.SUM,', 'mpi_op = {"sum": MPI.MAX,',
     ["tests/test_node_allreduce.py", "-k", "training and replicated_update and momentum"]),
    ("checkpoint written in place instead of renamed", "mpinn/checkpoint.py",
     'tmp = f"{path}.tmp-{os.getpid()}"', "tmp = path",
     ["tests/test_faults.py", "-k", "sigkill_while"]),
    ("checkpoint checksum not verified", "mpinn/checkpoint.py",
     'if "sha256" in a and checksum(params, state)', 'if False and checksum(params, state)',
     ["tests/test_checkpoint.py"]),
    ("resume restarts the optimizer's step count", "mpinn/engine.py",
     "        opt.t = step\n", "        opt.t = 0\n",
     ["tests/test_mpi_train.py", "-k", "resume"]),
    ("pipeline micro-batch gradients overwritten, not summed", "mpinn/pipeline.py",
     "accumulate=backwards > 0", "accumulate=backwards > 1",
     ["tests/test_pipeline.py", "-k", "matches_one_rank and 2-2-3"]),
    ("global shuffle: the same permutation every epoch", "mpinn/data/shuffle.py",
     "np.random.default_rng([seed, epoch, 2**31])", "np.random.default_rng([seed, 0, 2**31])",
     ["tests/test_data.py", "-k", "global_shuffle"]),
    ("cosine schedule upside down", "mpinn/lr.py",
     "(1 + math.cos(math.pi * progress)) / 2", "(1 - math.cos(math.pi * progress)) / 2",
     ["tests/test_torch_reference.py", "-k", "learning_rates"]),
    ("warm-up one update late", "mpinn/lr.py", "return base * (t + 1) / warmup",
     "return base * t / warmup", ["tests/test_torch_reference.py", "-k", "learning_rates"]),
    ("clipping scales up small gradients too", "mpinn/engine.py", "if factor < 1:",
     "if factor != 1:", ["tests/test_torch_reference.py", "-k", "above and 1 and rank"]),
    ("pipeline clipping norm from this stage only", "mpinn/pipeline.py",
     "lambda: self.control[2])", "lambda: kernels.sum_squares(self.grads))",
     ["tests/test_torch_reference.py", "-k", "clipping and stages"]),
    ("accumulated pieces overwrite each other", "mpinn/data_parallel.py",
     "self.net.grads += self.piece_grads", "self.net.grads[:] = self.piece_grads",
     ["tests/test_torch_reference.py", "-k", "accumulation"]),
    ("dropout without its 1/(1-p) scale", "mpinn/kernels.py", "                h[i, j] *= scale",
     "                h[i, j] *= 1", ["tests/test_torch_reference.py", "-k", "dropout_forward"]),
    ("dropout's mask forgotten in backward", "mpinn/kernels.py",
     "            if not _kept(drop[1], rows[i], unit0 + j, drop[0]):\n                d[i, j] = 0",
     "            if False:\n                d[i, j] = 0",
     ["tests/test_torch_reference.py", "-k", "dropout_forward"]),
    ("evaluation not summed over ranks", "mpinn/session.py",
     "loss_sum, correct, n, weight = self.comm.allreduce_sum(sums)",
     "loss_sum, correct, n, weight = sums",
     ["tests/test_commands.py", "-k", "evaluate_is_the_same"]),
    ("global shuffle: a round's rows land at the epoch's start", "mpinn/data/shuffle.py",
     "place = filled + np.argsort(src[want], kind=\"stable\")",
     "place = np.argsort(src[want], kind=\"stable\")",
     ["tests/test_data.py", "-k", "rounds_deliver"]),
    ("sharded update: parameters not gathered", "mpinn/reducers.py",
     "            self.shard.gather(self.engine.padded_params)", "            pass",
     ["tests/test_shard.py", "-k", "replicated_one and momentum and 2"]),
    ("sharded checkpoint: only this rank's slice of the state", "mpinn/shard.py",
     '            out.append(self.comm.allreduce_(full, "sum")[:self.n])',
     "            out.append(full[:self.n])",
     ["tests/test_shard.py", "-k", "interchangeable"]),
    ("node shared-memory sum (whole) leaves the third rank's slot out", "mpinn/comm/node.py",
     "            np.add(self.total, slots[k], out=self.total)", "            pass",
     ["tests/test_node_allreduce.py", "-k", "equals_mpi and whole and n1000 and 3ranks"]),
    ("node shared-memory sum (sliced) leaves the third rank's slot out", "mpinn/comm/node.py",
     "            np.add(out, slots[k, lo:hi], out=out)", "            pass",
     ["tests/test_node_allreduce.py", "-k", "equals_mpi and sliced and n1000 and 3ranks"]),
    ("node shared-memory sum: one set of slots (a rank ahead overwrites what another reads)",
     "mpinn/comm/node.py", "        self.parity ^= 1", "        self.parity ^= 0",
     ["tests/test_node_allreduce.py", "-k", "slow_reader and whole and 2ranks"]),
    ("node-sharded update: no fence after updating (a rank ahead reads stale parameters)",
     "mpinn/reducers.py",
     "        self.node_sum.fence()  # every slice updated before any rank's next forward pass",
     "        pass", ["tests/test_node_allreduce.py", "-k", "node_sharded_training_with_a_slow"]),
    ("node-sharded update: no fence in the finiteness check (totals read before all published)",
     "mpinn/shard.py",
     "        self.node_sum.fence()\n        bad, squares", "        bad, squares",
     ["tests/test_node_allreduce.py", "-k", "node_sharded_training_with_a_slow"]),
    ("engine trusts the gradient bound outright (no pass over a gradient it cannot certify)",
     "mpinn/reducers.py",
     "(bound_sum < kernels.CERTAIN_FINITE\n" + " " * 46 + "or kernels.all_finite(summed[:n]))",
     "(bound_sum < kernels.CERTAIN_FINITE)",
     ["tests/test_gradient_bound.py", "-k", "engine"]),
    ("node-sharded update: clipping norm from this rank's slice only", "mpinn/shard.py",
     "        bad, squares = self.node_sum.totals()[:2]",
     "        bad, squares = self.node_sum.control[self.node_sum.node.rank, :2]",
     ["tests/test_node_allreduce.py", "-k", "node_sharded_update and clipped_adam"]),
    ("node-sharded checkpoint: only this rank's slice of the state", "mpinn/shard.py",
     '            out.append(self.node_sum.node.allreduce_(full, "sum"))',
     "            out.append(full)",
     ["tests/test_node_allreduce.py", "-k", "node_sharded_update and momentum"]),
    ("mis-launch check blind to srun", "mpinn/runtime/launch.py",
     '    ("SLURM_STEP_NUM_TASKS", "srun"),\n', "", ["tests/test_launch.py"]),
    ("mis-launch check fires inside an allocation (Hydra's proxies)", "mpinn/runtime/launch.py",
     "    if world_size != 1:", "    if world_size < 1:", ["tests/test_launch.py"]),
    ("sweep trial run without its own options", "mpinn/sweep/run.py",
     "    values.update({k: check_value(TrainConfig, k, v, where) for k, v in trial.items()})",
     "", ["tests/test_sweep.py", "-k", "as_train_would"]),
    ("sweep skips a stopped trial on resume", "mpinn/sweep/results.py",
     'record["status"] in ("ok", "failed")', 'record["status"] in ("ok", "failed", "stopped")',
     ["tests/test_sweep.py", "-k", "sigterm"]),
    ("--resume auto ignores the checkpoint", "mpinn/resume.py",
     "    return options.replace(resume=Resume.YES if found else Resume.NO, overwrite=not found)",
     "    return options.replace(resume=Resume.NO, overwrite=True)",
     ["tests/test_launch.py", "-k", "resume_auto"]),
    ("streaming: runs of rows not cut where a stored chunk ends", "mpinn/data/read.py",
     "                                | (ordered % per_range == 0))",
     "                                & (ordered % per_range == 0))",
     ["tests/test_review_fixes.py", "-k", "many_chunks"]),
    ("scaling: moments merged without the between-part term", "mpinn/data/scaling.py",
     "m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / n)",
     "m2 = self.m2 + other.m2", ["tests/test_scaling.py", "-k", "merged or layout"]),
    ("scaling: streamed chunks trained unscaled", "mpinn/data/sources.py",
     "                    self.scale_(x)", "                    pass",
     ["tests/test_scaling.py", "-k", "streamed"]),
    ("scaling: predict leaves regression outputs in scaled units", "mpinn/evaluate.py",
     "mine[off:off + len(out)] = scaling.outputs_(arch.loss_fn.outputs_(out))",
     "mine[off:off + len(out)] = arch.loss_fn.outputs_(out)",
     ["tests/test_scaling.py", "-k", "regression"]),
    ("scaling: pipelined predict leaves regression outputs in scaled units", "mpinn/evaluate.py",
     "writer.write(off, scaling.outputs_(arch.loss_fn.outputs_(out)))",
     "writer.write(off, arch.loss_fn.outputs_(out))",
     ["tests/test_scaling.py", "-k", "regression"]),
    ("metrics: each rank's rows alone (no gather)", "mpinn/session.py",
     "return metrics.compute(self.metrics, all_y, all_out, integer,",
     "return metrics.compute(self.metrics, y, outputs, integer,",
     ["tests/test_metrics.py", "-k", "evaluate and cls and 3"]),
    ("validation split drawn differently at each rank count", "mpinn/data/split.py",
     "np.random.default_rng([seed, SPLIT_STREAM])",
     "np.random.default_rng([seed + ranks, SPLIT_STREAM])",
     ["tests/test_split.py", "-k", "any_rank_count"]),
    ("weighted loss: each rank divides by its own weights", "mpinn/trainer.py",
     "return local, self.comm.allreduce_sum(local)", "return local, local",
     ["tests/test_torch_reference.py", "-k", "3 and ranks and weighted"]),
    ("bce: positives not weighted by pos_weight", "mpinn/kernels.py",
     "weight = 1.0 + (pos_weight[j] - 1.0) * y", "weight = 1.0",
     ["tests/test_torch_reference.py", "-k", "bce"]),
    ("row weights lost in the global shuffle", "mpinn/data/sources.py",
     "ew[0] if ew else None)", "None)",
     ["tests/test_weights.py", "-k", "own_weights_train"]),
    ("metrics: tied scores ranked as wins in ROC AUC", "mpinn/metrics.py",
     "ranks[order[s:e]] = (s + 1 + e) / 2", "ranks[order[s:e]] = e",
     ["tests/test_metrics.py", "-k", "classification_metrics"]),
    ("AdamW: the decay not scaled by the learning rate", "mpinn/optim.py",
     "step, keep = lr / bias1, 1 - lr * weight_decay", "step, keep = lr / bias1, 1 - weight_decay",
     ["tests/test_optim.py", "-k", "adamw"]),
    ("LARS/LAMB: the trust ratio upside down", "mpinn/optim.py",
     "ratio = coefficient * w / u", "ratio = coefficient * u / w",
     ["tests/test_optim.py", "-k", "trust_ratio"]),
    ("LARS/LAMB: a block's norms not summed over the shards", "mpinn/shard.py",
     'return self.comm.allreduce_(squares, "sum")', "return squares",
     ["tests/test_shard.py", "-k", "replicated_one and lamb"]),
    ("leaky_relu: the slope left out of the derivative", "mpinn/kernels.py",
     "return one if v > 0 else slope", "return one if v > 0 else one - one",
     ["tests/test_torch_reference.py", "-k", "forward_loss_backward and leaky"]),
    ("gelu: the z * phi(z) term left out of the derivative", "mpinn/kernels.py",
     "+ v * 0.3989422804014327 * np.exp(-0.5 * v * v))", ")",
     ["tests/test_torch_reference.py", "-k", "forward_loss_backward and gelu"]),
    ("pipeline: a stage's kept z not used for the gradient sent back", "mpinn/kernels.py",
     "    if not _from_z(code):\n        return\n    if drop[0] > 0 and drop[2] > 0:",
     "    return\n    if drop[0] > 0 and drop[2] > 0:",
     ["tests/test_kernels.py", "-k", "stages_give"]),
]
TIMEOUT = 900  # seconds for one mutant's tests; a hang counts as caught (the suite's timeouts act)


def copy_project(dest):
    shutil.copytree(ROOT, dest, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))


def run_tests(copy, tests):
    """pytest exit code and seconds for these tests in the scratch copy."""
    env = {**os.environ, "PYTHONPATH": str(copy)}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                          *tests], cwd=copy, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return "timeout", time.perf_counter() - t0, out
    return p.returncode, time.perf_counter() - t0, out


def main(names):
    chosen = [m for m in MUTANTS if not names or m[0] in names]
    with tempfile.TemporaryDirectory(prefix="mpinn-mutants-") as tmp:
        copy = Path(tmp) / "project"
        copy_project(copy)
        for tests in sorted({tuple(m[4]) for m in chosen}):  # the unmutated copy must pass them
            code, seconds, out = run_tests(copy, list(tests))
            if code != 0:
                print(f"baseline fails: {' '.join(tests)}\n{out[-3000:]}")
                return 2
            print(f"baseline passes: {' '.join(tests)} ({seconds:.0f} s)", flush=True)
        rows, survived = [], 0
        for name, rel, text, new, tests in chosen:
            path = copy / rel
            original = path.read_text()
            assert original.count(text) == 1, f"{name}: the text to mutate occurs " \
                                              f"{original.count(text)} times in {rel}"
            path.write_text(original.replace(text, new))
            try:
                code, seconds, out = run_tests(copy, tests)
            finally:
                path.write_text(original)
            caught = code != 0 and code != 5  # 5: pytest ran no test
            survived += not caught
            rows.append((name, rel, " ".join(tests), "caught" if caught else "SURVIVED",
                         f"{seconds:.0f}"))
            print(f"{'caught  ' if caught else 'SURVIVED'} {name} ({seconds:.0f} s)", flush=True)
    print("\n| mutant | file | tests run | result | seconds |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{len(rows) - survived} of {len(rows)} mutants caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
