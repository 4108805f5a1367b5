#!/usr/bin/env python3
"""The trivial benchmark seed: no imports beyond the standard library, almost no state.

    {"n": 5}  ->  {"n": 5, "hello": "hello, world #5", "pid": ...}

Protocol and modes: see seedlib.py.
"""

import sys

import seedlib


def build(_opts):
    return {"greeting": "hello, world"}


def answer(state, request):
    n = int(request["n"])
    return {"n": n, "hello": "%s #%d" % (state["greeting"], n)}


if __name__ == "__main__":
    sys.exit(seedlib.main("hello_fn.py", build, answer))
