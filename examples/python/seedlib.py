"""The line protocol shared by the benchmark seeds (hello_fn, numpy_fn, image_fn,
json_fn, bigheap_fn).

It is the protocol of seed_fn.py: start-up builds the warm state, prints ``ready`` and then
every request line on stdin gets one JSON answer line on stdout, with "pid" as its last key.
Reads are direct read(0) syscalls and writes direct write(1) syscalls, so no Python-level
buffer holds input read before the seed was prepared, nor output not yet written.

Modes (command line of every seed):
  (default)      serve requests until EOF on stdin, then exit 0 (the mitosis seed).
  --fork-server  os.fork() a child per request that writes the answer and exits; the parent
                 waits for it (the local fork baseline).
  --linger       with --fork-server: the child waits to be killed after answering instead of
                 exiting, so its memory can be measured (the benchmark kills it).
  --fork-pool N  like --fork-server, but up to N children at once: the parent forks for each
                 request without waiting for the last child (the local fork children/s
                 baseline). Answers may come out of order.
  --once         build the state, answer one request, exit (the cold start baseline).
  --as-written   skip the warm-up request and ``settle()`` before ``ready``: the seed as a
                 user would write it, its heap left as start-up left it.

Every mode ends with os._exit(0), skipping the interpreter's teardown of the warm state.
  --mib N        a seed-specific size (bigheap_fn: the heap in MiB); ignored by the others.

Importing this module first also keeps BLAS/OpenMP single-threaded (a seed must be
single-threaded), as these variables must be set before numpy is imported.
"""

import ctypes
import gc
import json
import os
import signal
import sys

for _var in (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
):
    os.environ[_var] = "1"

READ_CHUNK = 65536


class Options:
    """The parsed command line."""

    def __init__(self, argv):
        self.fork_server = False
        self.linger = False
        self.once = False
        self.pool = 0
        self.mib = None
        self.as_written = False
        args = list(argv)
        while args:
            arg = args.pop(0)
            if arg == "--fork-server":
                self.fork_server = True
            elif arg == "--linger":
                self.linger = True
            elif arg == "--once":
                self.once = True
            elif arg == "--as-written":
                self.as_written = True
            elif arg == "--fork-pool" and args:
                self.pool = int(args.pop(0))
                if self.pool < 1:
                    raise ValueError("--fork-pool needs at least 1")
            elif arg == "--mib" and args:
                self.mib = int(args.pop(0))
            else:
                raise ValueError("unknown argument %r" % arg)


def write_all(fd, data):
    while data:
        written = os.write(fd, data)
        data = data[written:]


def lines():
    """Yields the lines of stdin (without the newline), reading with read(0) only when the
    previous line has been handled."""
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


def reply(answer, line):
    """The answer line (bytes) to one request line; a bad request gets an error line."""
    try:
        out = answer(json.loads(line))
    except Exception as err:
        out = {"error": "%s: %s" % (type(err).__name__, err)}
    out.pop("pid", None)
    # Insertion order is kept: "pid", the only field that differs between processes, is last.
    out["pid"] = os.getpid()
    return (json.dumps(out) + "\n").encode()


def serve(answer, opts):
    if opts.pool:
        serve_pool(answer, opts.pool)
        return
    for line in lines():
        if opts.fork_server:
            pid = os.fork()
            if pid == 0:
                try:
                    write_all(1, reply(answer, line))
                    if opts.linger:
                        while True:
                            signal.pause()
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
        else:
            write_all(1, reply(answer, line))
        if opts.once:
            return


def serve_pool(answer, most):
    """A child per request, up to `most` alive at once. Each answer line goes out in one
    write (shorter than PIPE_BUF), so lines from concurrent children never interleave."""
    alive = 0
    for line in lines():
        while alive >= most:
            os.wait()
            alive -= 1
        if os.fork() == 0:
            try:
                write_all(1, reply(answer, line))
            finally:
                os._exit(0)
        alive += 1
        # Reap whoever is done without blocking, so `alive` stays true.
        while alive and os.waitpid(-1, os.WNOHANG)[0]:
            alive -= 1
    while alive:
        os.wait()
        alive -= 1


def settle():
    """Leaves the warm heap as children will want it, just before ``ready``.

    Every object alive now moves to the collector's permanent generation, so a child's
    collections never walk (and so never fault in) the whole warm heap; the allocator hands
    its free pages back to the kernel, so a child's new objects land on fresh zero pages
    instead of pages the seed once used and freed, which would have to come from the seed.
    Both help a local fork (fewer copy-on-write faults) as much as a remote one.
    """
    gc.collect()
    gc.freeze()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def main(name, build, answer):
    """Runs a seed: `build(opts)` makes the warm state, `answer(state, request)` a dict."""
    try:
        opts = Options(sys.argv[1:])
    except ValueError as err:
        sys.stderr.write(
            "%s: %s\nusage: %s [--fork-server [--linger] | --fork-pool N | --once] [--as-written] [--mib N]\n"
            % (name, err, name)
        )
        return 2
    state = build(opts)
    if not opts.once and opts.as_written:
        write_all(1, b"ready\n")
    elif not opts.once:
        # One request before `ready`, so that lazy initialisation is part of the warm state
        # (a cold start pays for it in its one request instead).
        answer(state, {"n": 0})
        settle()
        write_all(1, b"ready\n")
    serve(lambda request: answer(state, request), opts)
    # Like the fork server's children, end without tearing the heap down object by object:
    # every answer already went out through os.write, and freeing a large warm state would
    # only cost time (and copy-on-write faults in a forked child).
    os._exit(0)
