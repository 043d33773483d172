"""`mpinn data convert` on a CSV against reading the same file with pyarrow alone.

    python benchmarks/csv_reader.py [ROWS] [FEATURES]

Writes a CSV with a header, FEATURES float columns and a text class column (default 300,000 x 64,
about 180 MB) in a temporary folder, then times, best of 3: pyarrow.csv.read_csv of the whole file
(floats as float32, the label as text: the parsing alone), and mpinn's conversion of it to HDF5
(parsing, checks, class-name mapping, writing). Prints both and their ratio (library / mpinn; the
target is at least 0.5).
"""
import os
import sys
import tempfile
import time

import numpy as np


def write_csv(path, rows, features):
    rng = np.random.default_rng(0)
    names = np.array(["setosa", "versicolor", "virginica", "other, quoted"])
    with open(path, "w") as fh:
        fh.write(",".join([f"x{i}" for i in range(features)] + ["species"]) + "\n")
        for start in range(0, rows, 50_000):
            n = min(50_000, rows - start)
            x = rng.normal(size=(n, features)).astype(np.float32)
            labels = names[rng.integers(0, len(names), n)]
            body = "\n".join(",".join(f"{v:.6g}" for v in row) + f',"{label}"'
                             for row, label in zip(x, labels))
            fh.write(body + "\n")


def best_of(fn, reps=3):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000
    features = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from mpinn.cli import main as mpinn_main
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "table.csv")
        write_csv(src, rows, features)
        size_mb = os.path.getsize(src) / 2**20
        types = {f"x{i}": pa.float32() for i in range(features)} | {"species": pa.string()}
        library = best_of(lambda: pacsv.read_csv(
            src, convert_options=pacsv.ConvertOptions(column_types=types)))
        out = os.path.join(tmp, "table.h5")
        mpinn = best_of(lambda: mpinn_main(["data", "convert", src, "--label-column", "species",
                                            "--out", out, "--overwrite"]))
    print(f"CSV {rows:,} rows x {features} features + a text label, {size_mb:.0f} MB; "
          f"pyarrow {pa.__version__}, {os.cpu_count()} cores")
    print(f"pyarrow.csv.read_csv alone:     {library:6.2f} s  ({size_mb / library:6.0f} MB/s)")
    print(f"mpinn data convert (to HDF5):   {mpinn:6.2f} s  ({size_mb / mpinn:6.0f} MB/s)")
    print(f"ratio library / mpinn: {library / mpinn:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
