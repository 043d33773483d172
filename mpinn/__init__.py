"""mpinn: train dense neural networks (MLPs) over MPI ranks.

Command line: `mpirun -n 8 python -m mpinn train ...` (cli.py). Python API (api.py):

    mpinn.fit(config=None, hooks=(), **train_options) -> FitResult   1 rank or under mpirun
    mpinn.load(checkpoint_path) -> Model                     Model.predict(x), Model.evaluate(x, y)
    mpinn.Hook                                               subclass to watch the training loop

Importing mpinn loads nothing heavy and starts no MPI; the API is imported on first use.
"""
__version__ = "0.1.0"
__all__ = ["fit", "load", "Model", "FitResult", "Hook", "__version__"]


def __getattr__(name):
    if name == "Hook":
        from .hooks import Hook
        return Hook
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'mpinn' has no attribute {name!r}")
