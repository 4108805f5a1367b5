#!/usr/bin/env python3
"""The probe seed of the container tests: reports what the process sees and uses resources.

    {"n": 5}                     ->  {"n": 5, "hello": "hello #5", "pid": ...}
    {"op": "whoami"}             ->  {"hostname": ..., "pids": [1, ...], "cwd": ...,
                                      "root_files": [...], "pid": ...}
    {"op": "alloc", "mib": 64}   ->  {"allocated": 64, "pid": ...}
    {"op": "read", "path": P}    ->  {"text": the first 200 characters of P, "pid": ...}
    {"op": "sleep", "secs": 0.5} ->  {"slept": 0.5, "pid": ...}

An allocation is made resident (one byte written per page) and held until the next request,
so that it is still counted when the reply is read. Standard library only.

Protocol and modes: see seedlib.py.
"""

import os
import socket
import sys
import time

import seedlib

PAGE = 4096


def build(_opts):
    return {"held": None}


def whoami():
    return {
        "hostname": socket.gethostname(),
        "pids": sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit()),
        "cwd": os.getcwd(),
        "root_files": sorted(os.listdir("/")),
    }


def alloc(state, mib):
    block = bytearray(mib << 20)
    # One slice assignment touches every page without a Python-level loop.
    block[::PAGE] = b"\x01" * len(range(0, len(block), PAGE))
    state["held"] = block
    return {"allocated": mib}


def read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return {"text": f.read(200)}


def answer(state, request):
    state["held"] = None  # drop the previous allocation
    op = request.get("op")
    if op is None:
        n = int(request["n"])
        return {"n": n, "hello": "hello #%d" % n}
    if op == "whoami":
        return whoami()
    if op == "alloc":
        return alloc(state, int(request["mib"]))
    if op == "read":
        return read(request["path"])
    if op == "sleep":
        secs = request["secs"]
        time.sleep(float(secs))
        return {"slept": secs}
    raise ValueError("unknown op %r" % op)


if __name__ == "__main__":
    sys.exit(seedlib.main("probe_fn.py", build, answer))
