#!/usr/bin/env python3
"""A multi-threaded numpy seed: OpenBLAS keeps a pool of worker threads, warmed before `ready`.

    {"n": 5}  ->  {"n": 5, "threads": 2, "sum": ..., "trace": ..., "norm": ..., "pid": ...}

"threads" is the number of threads of the process at that moment (/proc/self/task); the
numbers come from a 256x256 matrix product, large enough for OpenBLAS to split it between
its threads. A SIGUSR1 writes the line ``usr1`` to stdout (os.write, from a signal.signal
handler). Only the main thread takes SIGUSR1: it is blocked while numpy starts the BLAS
threads, so they inherit the blocked mask, and unblocked in the main thread afterwards; the
handler then runs while the main thread waits in read(0).

Protocol and modes (--once, --fork-server): see seedlib.py; every answer is computed the
same way in each mode, so a cold `--once` run gives the expected answer.
"""

import os
import signal
import sys

import seedlib

# seedlib pins BLAS to one thread; this seed wants the pool (set before numpy is imported).
os.environ["OPENBLAS_NUM_THREADS"] = "2"
os.environ["OMP_NUM_THREADS"] = "2"

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
import numpy as np  # noqa: E402  (the BLAS threads start here, with SIGUSR1 blocked)

signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})

SIZE = 256


def on_usr1(_signum, _frame):
    seedlib.write_all(1, b"usr1\n")


def thread_count():
    return len(os.listdir("/proc/self/task"))


def build(_opts):
    rng = np.random.default_rng(20250105)
    matrix = rng.standard_normal((SIZE, SIZE))
    # Wake the BLAS pool: a product this size is split between its threads.
    for _ in range(3):
        matrix @ matrix
    signal.signal(signal.SIGUSR1, on_usr1)
    return {"matrix": matrix}


def answer(state, request):
    n = int(request["n"])
    m = state["matrix"]
    prod = m @ (m + float(n))
    return {
        "n": n,
        "threads": thread_count(),
        "sum": round(float(prod.sum()), 6),
        "trace": round(float(np.trace(prod)), 6),
        "norm": round(float(np.linalg.norm(prod)), 6),
    }


if __name__ == "__main__":
    sys.exit(seedlib.main("threaded_fn.py", build, answer))
