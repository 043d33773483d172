"""Make data/digits-train.h5 and data/digits-test.h5 from the UCI optical handwritten digits that
scikit-learn ships (sklearn.datasets.load_digits: 1797 images of 8x8 pixels, 10 classes).

    pip install scikit-learn h5py && python data/make_digits.py

Stratified 80/20 split (seed 0), rows shuffled, features scaled from 0..16 to [0, 1] as float32,
labels int64. The output is deterministic for a given scikit-learn version.
"""
import argparse
from pathlib import Path

import h5py
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def write(path, x, y):
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=x.astype(np.float32))
        f.create_dataset("y", data=y.astype(np.int64))
        f.attrs["source"] = "UCI Optical Recognition of Handwritten Digits via sklearn load_digits"
        f.attrs["features"] = "8x8 pixel intensities scaled to [0, 1]"


def main():
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=str(here))
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    digits = load_digits()
    x = digits.data / 16.0
    xtr, xte, ytr, yte = train_test_split(x, digits.target, test_size=args.test_fraction,
                                          stratify=digits.target, random_state=args.seed)
    out = Path(args.out_dir)
    write(out / "digits-train.h5", xtr, ytr)
    write(out / "digits-test.h5", xte, yte)
    print(f"wrote {len(ytr)} training and {len(yte)} test rows to {out}")


if __name__ == "__main__":
    main()
