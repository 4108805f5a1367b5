#!/usr/bin/env python3
"""The numpy benchmark seed: numpy and Pillow imported, a small state, a cheap function.

The common serverless case: a function whose start-up is mostly importing a heavy runtime
(numpy + Pillow, tens of MB of mappings) while each request does very little with it: the sum
of a slice of a 64x64 array chosen by n, and a checksum of a 16x16 resize of a 32x32 window
(placed by n) of a small image.

    {"n": 5}  ->  {"n": 5, "slice_sum": ..., "thumb": ..., "pid": ...}

Protocol and modes: see seedlib.py.
"""

import sys

import seedlib  # first: keeps BLAS single-threaded

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

SIDE = 64
THUMB = 16


def build(_opts):
    """A deterministic SIDE x SIDE array and a grey image made from it."""
    array = np.arange(SIDE * SIDE, dtype=np.int64).reshape(SIDE, SIDE) % 251
    image = Image.fromarray(array.astype(np.uint8), "L")
    return {"array": array, "image": image}


def answer(state, request):
    n = int(request["n"])
    row = n % SIDE
    slice_sum = int(state["array"][row, : 1 + n % SIDE].sum())
    off = (n * 7) % (SIDE - 32)
    window = state["image"].crop((off, off // 2, off + 32, off // 2 + 32))
    thumb = window.resize((THUMB, THUMB), Image.BILINEAR)
    checksum = int(np.asarray(thumb, dtype=np.int64).sum())
    return {"n": n, "slice_sum": slice_sum, "thumb": checksum}


if __name__ == "__main__":
    sys.exit(seedlib.main("numpy_fn.py", build, answer))
