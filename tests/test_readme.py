"""The README's promise: every command in it runs as written. Its shell commands (indented blocks)
run in order, with the environment activated as the README says, from an empty temporary folder;
its Python example runs as a script there too. The set-up commands (`make ...`) and the activation
line are the two not run here: `make test` is this very suite, and CI runs it."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, mpinn_env

README = (ROOT / "README.md").read_text()
SKIP = ("make ", ". .venv/bin/activate")


def shell_commands(text):
    """Lines of indented code blocks (outside fenced blocks), in order, without set-up lines."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("    ") and line.strip():
            command = line.strip()
            if not command.startswith(SKIP):
                out.append(command)
    return out


def python_examples(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_has_the_commands_we_run():
    commands = shell_commands(README)
    assert commands[0].startswith("mpirun -n 4 python -m mpinn train")
    for word in ("train", "evaluate", "predict", "data synth", "--resume", "--pipeline-stages",
                 "sweep --grid", "bench", "scale", "jobs slurm"):
        assert any(word in c for c in commands), word
    assert len(python_examples(README)) == 1


def test_every_readme_command_runs_as_written(tmp_path):
    env = mpinn_env({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    for command in shell_commands(README):
        p = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=240, start_new_session=True)
        assert p.returncode == 0, f"{command}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    for name in ("first", "digits", "synth", "pipe"):
        assert (tmp_path / "runs" / name / "checkpoint.h5").is_file(), name
    assert (tmp_path / "runs" / "digits" / "predictions.h5").is_file()
    assert (tmp_path / "runs" / "scaling" / "report.md").is_file()
    assert "4 trials: 4 ok" in (tmp_path / "runs" / "sweep" / "results.md").read_text()
    assert "#SBATCH --nodes=2" in (tmp_path / "runs" / "train.sbatch").read_text()
    (script,) = python_examples(README)
    (tmp_path / "example.py").write_text(script + "\nassert probabilities.shape == (1000, 4)\n"
                                         "assert 0 <= accuracy <= 1 and loss > 0\n")
    p = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "runs" / "api" / "checkpoint.h5").is_file()


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_docs_links_resolve(page):
    text = (ROOT / "docs" / page).read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in target:
            assert (ROOT / "docs" / target).exists(), f"{page}: {target}"
