"""The validation split of a training file (--val-fraction): which of its rows validate and which
train, drawn from the run's seed and the file's row count alone, so every rank, any rank count, a
resumed run and `mpinn evaluate` find the same rows without storing them."""
import numpy as np

from ..errors import UsageError

SPLIT_STREAM = 0x5B1D  # keeps the split's draws apart from the shuffles' and dropout's of one seed


def split_rows(n_rows, fraction, seed, ranks=1):
    """(training rows, validation rows) of a file of n_rows: round(fraction * n_rows) rows drawn
    without replacement validate, both lists ascending (file order). Each part must leave every
    reader a row."""
    n_val = int(round(fraction * n_rows))
    n_train = n_rows - n_val
    if n_val < 1 or n_train < ranks:
        raise UsageError(f"--val-fraction {fraction} of {n_rows} rows leaves {n_val} validation "
                         f"and {n_train} training rows; {ranks} rank(s) need at least one each "
                         "of training rows and one validation row")
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(n_rows)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
