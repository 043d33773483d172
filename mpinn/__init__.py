"""mpinn: train dense neural networks (MLPs) over MPI ranks.

Command line: `mpirun -n 8 python -m mpinn train ...` (cli.py). Python API (api.py):

    mpinn.fit(config=None, **train_options) -> FitResult    train, 1 rank or under mpirun
    mpinn.load(checkpoint_path) -> Model                     Model.predict(x), Model.evaluate(x, y)

Importing mpinn loads nothing heavy and starts no MPI; the API is imported on first use.
"""
__version__ = "0.1.0"
__all__ = ["fit", "load", "Model", "FitResult", "__version__"]


def __getattr__(name):
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'mpinn' has no attribute {name!r}")
