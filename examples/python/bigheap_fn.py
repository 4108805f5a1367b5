#!/usr/bin/env python3
"""The big-heap benchmark seed: holds a large heap (1 GiB unless --mib N) of non-zero,
pseudo-random 64-bit words, so every page of it is real memory. A request reads a few
scattered words and returns their checksum.

    {"n": 5}  ->  {"n": 5, "mib": 1024, "checksum": ..., "xor": ..., "pid": ...}

Protocol and modes: see seedlib.py.
"""

import sys

import seedlib  # first: keeps BLAS single-threaded

import numpy as np  # noqa: E402

DEFAULT_MIB = 1024
CHUNK = 1 << 21  # words filled per step (16 MiB), to keep the peak near the heap's size
PROBES = 64
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def build(opts):
    mib = opts.mib or DEFAULT_MIB
    words = mib * (1 << 20) // 8
    heap = np.empty(words, dtype=np.uint64)
    for start in range(0, words, CHUNK):
        block = np.arange(start + 1, min(start + CHUNK, words) + 1, dtype=np.uint64)
        block *= GOLDEN
        block ^= block >> np.uint64(29)
        heap[start : start + len(block)] = block | np.uint64(1)
    return {"mib": mib, "heap": heap}


def answer(state, request):
    n = int(request["n"])
    heap = state["heap"]
    k = np.arange(PROBES, dtype=np.uint64)
    at = (np.uint64(n) * np.uint64(2654435761) + k * np.uint64(2246822519)) % np.uint64(len(heap))
    picked = heap[at]
    return {
        "n": n,
        "mib": state["mib"],
        "checksum": int(picked.sum(dtype=np.uint64)),
        "xor": int(np.bitwise_xor.reduce(picked)),
    }


if __name__ == "__main__":
    sys.exit(seedlib.main("bigheap_fn.py", build, answer))
