"""Files that ship inside the package (importlib.resources), so a wheel install finds them: the
bundled digits data (assets/data) and the SLURM/PBS job templates (assets/jobs). The top-level
data/ and jobs/ of a clone are links to these, not copies."""
from importlib import resources

from ..errors import UsageError


def path(*parts):
    """A pathlib-like Traversable of a shipped file, e.g. path("data", "digits-train.h5")."""
    return resources.files(__name__).joinpath(*parts)


def file_path(*parts):
    """The file-system path of a shipped file as a string (the package is installed unzipped)."""
    p = path(*parts)
    if not p.is_file():
        raise UsageError(f"the bundled file {'/'.join(parts)} is missing from this mpinn "
                         f"installation ({p})")
    return str(p)
