"""How options are declared, checked and read, for every command.

An option is a dataclass field made by `option()`: its default, help text and policy sit next to
it as metadata (choices, a bound, how a TOML/API value is taken, how the flag reads, and for train
options what resume and sweeps do with it). From that one declaration cli.py generates the
command line, `load_toml` reads config files and `from_options` the Python API's keywords; the
three agree on names (`batch_size` <-> `--batch-size` <-> `batch-size = ...`) and on types.

`mpinn train`'s options are declared in typed sections (config.py); `flat_config` turns sections
into the one flat record the command line, TOML and the API fill in (values as given, checked),
and `Sections.from_flat` parses that record into the sections' real types.
"""
import dataclasses
import difflib
import math
import re
import reprlib
import tomllib
from dataclasses import dataclass, field

from .errors import UsageError


@dataclass(frozen=True)
class Bound:
    """A rule on one value, with the words that say it (`--lr must be positive`)."""
    holds: object
    words: str

    def check(self, name, value):
        if not self.holds(value):
            raise UsageError(f"--{name.replace('_', '-')} must {self.words}, got {value}")


POSITIVE = Bound(lambda v: v > 0, "be positive")
NON_NEGATIVE = Bound(lambda v: v >= 0, "not be negative")
FRACTION = Bound(lambda v: 0 <= v < 1, "be in [0, 1)")


def option(default, help, choices=None, positional=False, *, bound=None, parse=None, show=None,
           coerce=None, accepts=(), flag_type=None, bare=None, negative=None, kept_on_resume=False,
           set_by_sweep=False, changeable_on_resume=False):
    """A config field. `default` is as the command line writes it; `parse` turns such a value
    into the section's real type (and `show` back, for records); `coerce` accepts another TOML/API
    spelling (a list of widths) and `accepts` more types as given (a boolean); `bare` is the
    value of the flag given without one and `negative` = (value, help) adds --no-FLAG. Train
    policy: kept on resume (the checkpoint's value wins), set by a sweep for each trial,
    changeable when a sweep is continued."""
    return field(default=parse(default) if parse else default, metadata={
        "help": help, "choices": choices, "positional": positional, "bound": bound,
        "parse": parse, "show": show, "coerce": coerce, "accepts": accepts, "flag_default": default,
        "flag_type": flag_type, "bare": bare, "negative": negative,
        "kept_on_resume": kept_on_resume, "set_by_sweep": set_by_sweep,
        "changeable_on_resume": changeable_on_resume})


def flag_type(f):
    """The type of a field's value as the command line, TOML and the API give it."""
    return f.metadata.get("flag_type") or f.type


def names_where(cls, policy):
    """The fields of a (flat) config class whose metadata sets this policy, in order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(policy))


class Sections:
    """A record of typed option sections (a dataclass whose fields are section dataclasses)."""

    @classmethod
    def section_fields(cls):
        """(section name, field) of every option, in declaration order."""
        return [(s.name, f) for s in dataclasses.fields(cls) for f in dataclasses.fields(s.type)]

    @classmethod
    def from_flat(cls, values):
        """The sections from flat values (a flat config or a dict), each parsed to its type."""
        get = values.get if isinstance(values, dict) else lambda k: getattr(values, k)
        parts = {}
        for s in dataclasses.fields(cls):
            parts[s.name] = s.type(**{f.name: parsed(f, get(f.name))
                                      for f in dataclasses.fields(s.type)})
        return cls(**parts)

    def flat(self):
        """{option name: value as the command line writes it}: what checkpoints record."""
        out = {}
        for section, f in self.section_fields():
            value = getattr(getattr(self, section), f.name)
            show = f.metadata.get("show")
            out[f.name] = show(value) if show else value
        return out

    def replace(self, **updates):
        """A copy with options changed by name (values as the command line or a checkpoint
        writes them, or already parsed)."""
        where = {f.name: (section, f) for section, f in self.section_fields()}
        changed = {}
        for name, value in updates.items():
            section, f = where[name]
            changed.setdefault(section, {})[name] = parsed(f, value)
        return dataclasses.replace(self, **{s: dataclasses.replace(getattr(self, s), **v)
                                            for s, v in changed.items()})


def parsed(f, value):
    parse = f.metadata.get("parse")
    return parse(value) if parse else value


def flat_config(name, sections, validate, doc, extra_fields=(), methods=None):
    """The flat config class of a Sections record: one field per option (default and type as the
    command line gives them), checked by the fields' bounds and then `validate`."""
    fields = list(extra_fields) + [
        (f.name, flag_type(f), dataclasses.field(default=f.metadata["flag_default"],
                                                 metadata=f.metadata))
        for _, f in sections.section_fields()]
    return dataclasses.make_dataclass(name, fields, namespace={
        "validate": validate, "__doc__": doc, "sections": lambda self: sections.from_flat(self),
        **(methods or {})})


def check_value(cls, name, value, where):
    """Type-check one value for field `name` of dataclass `cls`; ints are accepted for floats and
    a field's `coerce` takes its other spellings."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    expected = flag_type(f)
    coerce = f.metadata.get("coerce")
    if coerce is not None:
        value = coerce(value)
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    ok = ok or isinstance(value, f.metadata.get("accepts", ()))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:  # reprlib: an array given by mistake is named by its start, not printed whole
        raise UsageError(f"{where}: {name} must be {expected.__name__}, got "
                         f"{type(value).__name__} {reprlib.repr(value)}")
    choices = f.metadata.get("choices")
    if choices and isinstance(value, str) and value not in choices:
        raise UsageError(f"{where}: {name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def build(cls, values):
    """The validated config of dataclass cls from already type-checked values."""
    cfg = cls(**values)
    for f in dataclasses.fields(cls):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    for f in dataclasses.fields(cls):
        if f.metadata.get("bound"):
            f.metadata["bound"].check(f.name, getattr(cfg, f.name))
    cfg.validate()
    return cfg


# what other tools call an option (scikit-learn, Keras, PyTorch scripts) -> its name here
OTHER_NAMES = {"learning_rate": "lr", "learning_rate_init": "lr", "n_epochs": "epochs",
               "num_epochs": "epochs", "max_iter": "epochs", "batch": "batch_size",
               "hidden_layer_sizes": "hidden", "random_state": "seed", "alpha_l2": "weight_decay",
               "l2": "weight_decay", "drop_rate": "dropout", "optim": "optimizer"}


def in_python(message, cls):
    """A message written for the command line, for a Python caller of `cls`'s options: --flag
    becomes flag=True, --no-flag flag=False, --resume resume='yes', any other --name name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}

    def keyword(m):
        negated, name = m.group(1), m.group(2).replace("-", "_")
        f = fields.get(name)
        if f is None or (negated and flag_type(f) is not bool):
            return m.group(0)
        if flag_type(f) is bool:
            return f"{name}={not negated}"
        return "resume='yes'" if name == "resume" else name
    return re.sub(r"--(no-)?([a-z][a-z0-9-]*)", keyword, message)


def did_you_mean(name, names):
    """'; did you mean ...?' naming the closest options, or where to find them all."""
    if OTHER_NAMES.get(name) in names:
        return f"; did you mean {OTHER_NAMES[name]!r}?"
    close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.6)
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return f" (none is close; the {len(names)} options: the command's --help)"


def from_options(cls, config_file=None, where="options", **options):
    """A validated config from a TOML file and keyword options (the options win), type-checked
    as the command line and config files are: the Python API's way in."""
    values = load_toml(cls, config_file) if config_file else {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in options.items():
        name = key.replace("-", "_")
        if name not in names:
            raise UsageError(f"{where}: unknown option {key!r}{did_you_mean(name, names)}")
        values[name] = check_value(cls, name, value, where)
    return build(cls, values), frozenset(values)


def load_toml(cls, path):
    """The keys of a TOML config file for `cls`, type-checked; '-' and '_' in keys are the same."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"--config {path} is a folder; give a TOML file") from None
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid TOML: {e}") from None
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in names:
            raise UsageError(f"{path}: unknown key {key!r}{did_you_mean(name, names)}")
        out[name] = check_value(cls, name, value, path)
    return out
