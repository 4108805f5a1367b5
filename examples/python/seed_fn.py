#!/usr/bin/env python3
"""A warmed Python "function runtime", used as a mitosis seed.

Start-up does the expensive part once: import numpy and build some warm
state. Then the process prints ``ready`` and serves requests, one JSON line
each, from stdin:

    {"n": 5}  ->  {"n": 5, "sum": <sum(M @ [n]*256), 6 places>, "norm": ..., "label": ..., "pid": ...}

The answer's keys always come in that order, with "pid" (the only field that differs
between processes) last.

Modes:
  (default)      serve requests until EOF on stdin, then exit 0. This is the
                 mode a mitosis seed runs in: it is prepared while blocked in
                 read(0), and every remote child re-issues that read on its
                 own stdin, so it answers exactly the request given to it.
  --fork-server  for every request, os.fork() a child that computes and
                 writes the answer, then os._exit(0)s; the parent waits for
                 it (the local fork baseline).
  --once         handle a single request, then exit (the cold start
                 baseline: spawn-to-answer includes interpreter start-up and
                 importing numpy).

Reads are direct read(0) syscalls (os.read) and writes direct write(1)
syscalls (os.write): no Python-level buffer ever holds input that was read
before the seed was prepared, nor output not yet written.
"""

import os
import sys

# A seed must be single-threaded: keep BLAS/OpenMP from starting thread pools.
# These must be set before numpy is imported.
for _var in (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
):
    os.environ[_var] = "1"

import json  # noqa: E402

import numpy as np  # noqa: E402

SIZE = 256
READ_CHUNK = 65536


def build_state():
    """The warm state every request uses."""
    rng = np.random.default_rng(20240601)
    matrix = rng.standard_normal((SIZE, SIZE))
    # Touch it through BLAS once so any lazy initialisation happens now.
    matrix @ np.ones(SIZE)
    labels = {i: "label-%02d" % i for i in range(64)}
    return {"matrix": matrix, "labels": labels}


STATE = build_state()


def answer(request):
    """The deterministic answer to one request (a dict parsed from JSON)."""
    n = request["n"]
    vec = np.full(SIZE, float(n))
    prod = STATE["matrix"] @ vec
    return {
        "n": n,
        "sum": round(float(prod.sum()), 6),
        "norm": round(float(np.linalg.norm(prod)), 6),
        "label": STATE["labels"][int(n) % len(STATE["labels"])],
        "pid": os.getpid(),
    }


def write_all(fd, data):
    while data:
        written = os.write(fd, data)
        data = data[written:]


def handle(line):
    """Answers one request line; returns the bytes to write."""
    try:
        reply = answer(json.loads(line))
    except Exception as err:  # a bad request gets an error line, not a crash
        reply = {"error": "%s: %s" % (type(err).__name__, err), "pid": os.getpid()}
    # Insertion order is kept: "pid" stays the last key.
    return (json.dumps(reply) + "\n").encode()


def lines():
    """Yields the lines of stdin (without the newline), reading with read(0).

    Nothing is read before it is asked for: while the previous line is being
    handled, no read is outstanding, and the buffer only ever holds the rest
    of what one read returned.
    """
    pending = b""
    while True:
        newline = pending.find(b"\n")
        if newline >= 0:
            line, pending = pending[:newline], pending[newline + 1 :]
            if line.strip():
                yield line
            continue
        chunk = os.read(0, READ_CHUNK)
        if not chunk:
            if pending.strip():
                yield pending
            return
        pending += chunk


def serve(fork_server, once):
    for line in lines():
        if fork_server:
            pid = os.fork()
            if pid == 0:
                try:
                    write_all(1, handle(line))
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
        else:
            write_all(1, handle(line))
        if once:
            return


def main(argv):
    fork_server = "--fork-server" in argv
    once = "--once" in argv
    unknown = [a for a in argv if a not in ("--fork-server", "--once")]
    if unknown:
        sys.stderr.write("usage: seed_fn.py [--fork-server | --once]\n")
        return 2
    if not once:
        write_all(1, b"ready\n")
    serve(fork_server, once)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
