"""What a sweep trains: the trials of a GRID.toml, as plain dicts of train options (pure: no MPI).

    [grid]                      # every combination of these lists is a trial
    lr = [0.001, 0.01]
    hidden = ["64", "128,64"]

    [[trial]]                   # and each of these tables one more
    lr = 0.1
    optimizer = "sgd"

Keys are `mpinn train` option names ('-' and '_' alike). Unknown keys, keys a sweep sets itself
and grid entries that are not non-empty lists stop the sweep before it starts; a value of the
wrong type or out of range fails only its own trial (the others still train).
"""
import dataclasses
import itertools
import math
import random
import tomllib

from ..config import SET_BY_SWEEP, TrainConfig
from ..errors import UsageError

TRAIN_OPTIONS = {f.name for f in dataclasses.fields(TrainConfig)}


def load_trials(path, sample=0, seed=0):
    """-> (varied option names in first-seen order, list of trials: {option: value})."""
    raw = read_toml(path)
    unknown = set(raw) - {"grid", "trial"}
    if unknown:
        raise UsageError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}; a grid file has "
                         "[grid] and [[trial]] tables")
    grid = {option_name(k, path): v for k, v in raw.get("grid", {}).items()}
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UsageError(f"{path}: [grid] {name} must be a non-empty list of values, got "
                             f"{values!r}")
    explicit = raw.get("trial", [])
    if not isinstance(explicit, list) or not all(isinstance(t, dict) for t in explicit):
        raise UsageError(f"{path}: trials are [[trial]] tables")
    explicit = [{option_name(k, path): v for k, v in t.items()} for t in explicit]
    trials = combinations(grid, sample, seed) + explicit
    if not trials:
        raise UsageError(f"{path}: no trials: give a [grid] table and/or [[trial]] tables")
    varied = list(dict.fromkeys(k for t in trials for k in t))
    return varied, trials


def read_toml(path):
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"--grid {path}: file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--grid {path} is not valid TOML: {e}") from None


def option_name(key, path):
    name = key.replace("-", "_")
    if name in SET_BY_SWEEP:
        raise UsageError(f"{path}: {key} is set by the sweep for each trial (OUT/trial-NNN); "
                         "remove it from the grid")
    if name not in TRAIN_OPTIONS:
        raise UsageError(f"{path}: {key!r} is not an `mpinn train` option")
    return name


def combinations(grid, sample, seed):
    """Every combination of the grid's lists (the last option varies fastest), or `sample` of
    them drawn without replacement by seed, in the order drawn (the grid is never expanded)."""
    if not grid:
        return []
    names, lists = list(grid), list(grid.values())
    total = math.prod(len(v) for v in lists)
    if not sample or sample >= total:
        return [dict(zip(names, combo)) for combo in itertools.product(*lists)]
    return [dict(zip(names, nth_combination(lists, i)))
            for i in random.Random(seed).sample(range(total), sample)]


def nth_combination(lists, index):
    """The index-th element of itertools.product(*lists), without building the product."""
    out = []
    for values in reversed(lists):
        index, k = divmod(index, len(values))
        out.append(values[k])
    return out[::-1]


def describe(trial):
    """'lr=0.01 hidden=64' for a trial's options."""
    return " ".join(f"{k}={v}" for k, v in trial.items()) or "(the base options)"
