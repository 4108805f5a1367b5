#!/usr/bin/env python3
"""A warmed Python "function runtime", used as a mitosis seed (the demo's and the tests').

Start-up does the expensive part once: import numpy and build some warm state. Then the
process prints ``ready`` and serves requests, one JSON line each, from stdin:

    {"n": 5}  ->  {"n": 5, "sum": <sum(M @ [n]*256), 6 places>, "norm": ..., "label": ..., "pid": ...}

The answer's keys always come in that order, with "pid" (the only field that differs
between processes) last.

A mitosis seed runs in the default mode: it is prepared while blocked in read(0), and every
remote child re-issues that read on its own stdin, so it answers exactly the request given
to it. `--fork-server` is the local fork baseline and `--once` the cold start baseline.
Protocol and modes: see seedlib.py.
"""

import sys

import seedlib  # first: keeps BLAS single-threaded

import numpy as np  # noqa: E402

SIZE = 256


def build(_opts):
    """The warm state every request uses."""
    rng = np.random.default_rng(20240601)
    matrix = rng.standard_normal((SIZE, SIZE))
    # Touch it through BLAS once so any lazy initialisation happens now.
    matrix @ np.ones(SIZE)
    labels = {i: "label-%02d" % i for i in range(64)}
    return {"matrix": matrix, "labels": labels}


def answer(state, request):
    """The deterministic answer to one request (a dict parsed from JSON)."""
    n = request["n"]
    vec = np.full(SIZE, float(n))
    prod = state["matrix"] @ vec
    return {
        "n": n,
        "sum": round(float(prod.sum()), 6),
        "norm": round(float(np.linalg.norm(prod)), 6),
        "label": state["labels"][int(n) % len(state["labels"])],
    }


if __name__ == "__main__":
    sys.exit(seedlib.main("seed_fn.py", build, answer))
