"""Options: one source of defaults, TOML under the command line, strict keys and types."""
import dataclasses

import pytest

from mpinn.cli import COMMANDS, build_parser, parse
from mpinn.config import TrainConfig
from mpinn.errors import UsageError


def test_help_lists_every_option_with_its_default(capsys):
    for command, (cls, _) in COMMANDS.items():
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command.split(), "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for f in dataclasses.fields(cls):
            if f.metadata.get("positional"):
                choices = f.metadata["choices"]
                assert ("{" + ",".join(choices) + "}" if choices else f.name.upper()) in text
                continue
            flag = "--" + f.name.replace("_", "-")
            assert flag in text, flag
            words = f.metadata["help"]
            if "(default" in words:  # the help says the default in words: argparse adds nothing
                assert " ".join(words.split()) in text, f.name
            else:
                assert f"(default: {f.default!r})" in text, f.name
        options = [f for f in dataclasses.fields(cls) if not f.metadata.get("positional")]
        assert text.count("(default") == len(options), command  # each default said once


def test_command_line_wins_over_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = 0.5\nbatch-size = 32\nhidden = [16, 8]\nshuffle = false\n')
    _, cfg, explicit = parse(["train", "--config", str(path), "--lr", "0.1"])
    assert cfg.lr == 0.1 and cfg.batch_size == 32 and cfg.hidden_sizes() == (16, 8)
    assert cfg.shuffle == "none" and cfg.epochs == TrainConfig.epochs  # a boolean still works
    assert {"lr", "batch_size", "hidden", "shuffle"} <= explicit and "epochs" not in explicit


@pytest.mark.parametrize("toml,message", [
    ("learning_rate = 0.1", "unknown key 'learning_rate'"),
    ("epochs = 'ten'", "epochs must be int"),
    ("epochs = 2.5", "epochs must be int"),
    ("shuffle = 1", "shuffle must be str"),
    ("shuffle = 'random'", "shuffle must be one of rank, global, none"),
    ("activation = 'mish'", "activation must be one of"),
    ("lr = [", "not valid TOML"),
])
def test_bad_toml_is_refused(tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    with pytest.raises(UsageError, match=message):
        parse(["train", "--config", str(path)])


@pytest.mark.parametrize("argv,message", [
    (["train", "--lr", "0"], "--lr must be positive"),
    (["train", "--lr", "nan"], "--lr must be a finite number"),
    (["train", "--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["train", "--epochs", "-1"], "--epochs must be positive"),
    (["train", "--batch-size", "0"], "--batch-size must be positive"),
    (["train", "--hidden", "12,x"], "--hidden must be comma-separated"),
    (["train", "--activation", "mish"], "invalid choice"),
    (["train", "--loss", "hinge"], "invalid choice"),
    (["train", "--optimizer", "adagrad"], "invalid choice"),
    (["train", "--epochs", "x"], "invalid int value"),
    (["train", "--resume", "--init", "a.h5"], "exclude each other"),
    (["predict", "--out", "p.txt"], "must end in"),
    (["fly"], "invalid choice"),
    (["train", "--config", "/nonexistent.toml"], "config file not found"),
])
def test_bad_options_are_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse(argv)


def test_defaults_validate():
    positional = {"jobs": ["slurm"], "data inspect": ["some.h5"], "data stats": ["some.h5"],
                  "data convert": ["in.csv"],
                  "sweep": ["--grid", "grid.toml"]}  # the grid is what a sweep trains: required
    for command in COMMANDS:
        parse([*command.split(), *positional.get(command, [])])
