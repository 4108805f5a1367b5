#!/usr/bin/env python3
"""The image benchmark seed: numpy and Pillow imported, a source image built at start-up.

Every request does real image work on the warm state: crop a window chosen by n, rotate,
resize, blur and edge-filter it with Pillow, then measure the result with numpy.

    {"n": 5}  ->  {"n": 5, "size": [w, h], "sum": ..., "mean": ..., "edges": ..., "pid": ...}

"io_ms" (optional) waits that long before answering, without using the CPU: the time a real
image function spends fetching its input from and storing its output to a storage service
(FunctionBench's downloads from and uploads to S3), which a one-machine testbed has no
service for.

Protocol and modes: see seedlib.py.
"""

import sys
import time

import seedlib  # first: keeps BLAS single-threaded

import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

SIDE = 1024
OUT = 256


def build(_opts):
    """A deterministic SIDE x SIDE RGB image: gradients plus seeded noise."""
    rng = np.random.default_rng(20240602)
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    noise = rng.integers(0, 64, size=(SIDE, SIDE, 3))
    pixels = np.stack(
        [(x * 255) // SIDE, (y * 255) // SIDE, ((x + y) * 255) // (2 * SIDE)], axis=-1
    )
    pixels = np.clip(pixels + noise - 32, 0, 255).astype(np.uint8)
    return {"image": Image.fromarray(pixels, "RGB"), "weights": np.array([0.299, 0.587, 0.114])}


def answer(state, request):
    n = int(request["n"])
    image = state["image"]
    off = (n * 37) % (SIDE // 2)
    window = image.crop((off, off // 2, off + SIDE // 2, off // 2 + SIDE // 2))
    window = window.rotate((n * 7) % 360, resample=Image.BILINEAR)
    small = window.resize((OUT, OUT), Image.BILINEAR)
    blurred = small.filter(ImageFilter.GaussianBlur(radius=1 + n % 3))
    edges = np.asarray(blurred.convert("L").filter(ImageFilter.FIND_EDGES), dtype=np.int64)
    rgb = np.asarray(blurred, dtype=np.float64)
    luma = rgb @ state["weights"]
    io_ms = float(request.get("io_ms", 0))
    if io_ms > 0:
        time.sleep(io_ms / 1000)
    return {
        "n": n,
        "size": list(blurred.size),
        "sum": int(np.asarray(blurred, dtype=np.int64).sum()),
        "mean": round(float(luma.mean()), 6),
        "edges": int(edges.sum()),
    }


if __name__ == "__main__":
    sys.exit(seedlib.main("image_fn.py", build, answer))
