"""Data and model tools: datatools (synth, inspect), convert (npz, CSV, IDX to HDF5), export (ONNX,
PyTorch, npz)."""
