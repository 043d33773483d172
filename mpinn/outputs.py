"""Where mpinn writes: the checks every command makes before it writes an output file or fills a run
folder, so a bad path is one clear error before any work is done."""
import os

from .errors import UsageError


def check_output_path(path, option="--out"):
    """An output file's folder must exist and the path must not be a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: directory {folder} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a directory")


def prepare_run_dir(path):
    """Create the run folder (and its parents) or say why it cannot be used."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--run-dir {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --run-dir {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"--run-dir {path} is not writable")
