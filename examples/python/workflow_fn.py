"""A workflow that hands its in-memory state to the next steps by forking (mitosis.fork_prepare).

Every line it prints is one JSON object. Modes:

  fanout SOCK...   prepare once; the parent then keeps rewriting its state on a thread while
                   one child per SOCK (a host's daemon) runs; each child reports the state it
                   sees (the state at the prepare point) and exits with its index.
  chain SOCK...    generation 0 prepares and resumes generation 1 on the first SOCK, which
                   changes the state, prepares itself and resumes generation 2 on the next
                   SOCK, and so on: each generation checks it sees its parent's state at the
                   parent's prepare point, and reports how long its own prepare took.
  forked SOCK      a child os.fork()s; the grandchild's fork_prepare is refused (multi-hop is
                   only for the daemon's own children).
  nohost SOCK      fork_prepare where no daemon listens: the exception, then it runs on.

The state: a list of the generations so far and a blob of BLOB_MIB MiB filled with the
generation's number, rewritten with 0xEE by the parent right after its prepare.
"""

import hashlib
import json
import os
import random
import sys
import threading
import time

import mitosis

BLOB_MIB = int(os.environ.get("WORKFLOW_BLOB_MIB", "16"))


def out(**kv):
    sys.stdout.write(json.dumps(kv) + "\n")
    sys.stdout.flush()


def blob_is(blob, value):
    return blob.count(value) == len(blob)


def fanout(socks):
    blob = bytearray([1]) * (BLOB_MIB << 20)
    state = {"counter": 1, "words": ["before"]}
    # Under a profile: a run of this program after the first starts its children with what
    # the earlier runs' children touched first.
    h = mitosis.fork_prepare(profile="workflow_fn/fanout")
    if h.is_child:
        out(
            role="child",
            index=h.index,
            arg=h.arg.decode(),
            counter=state["counter"],
            words=state["words"],
            blob_ok=blob_is(blob, 1),
            digest=hashlib.sha256(blob).hexdigest()[:16],
            random=random.random(),
        )
        os._exit(h.index)
    stop = threading.Event()

    def scribble():
        n = 0
        while not stop.is_set():
            n += 1
            state["counter"] = 1000 + n
            state["words"].append("after")
            blob[(n * 4096) % len(blob)] = 0xEE
            time.sleep(0.001)

    t = threading.Thread(target=scribble)
    t.start()
    for i in range(len(blob) // 4096 // 2):
        blob[i * 4096] = 0xEE
    results = mitosis.resume_many(h, [f"job-{i}" for i in range(len(socks))], host=list(socks))
    stop.set()
    t.join()
    out(
        role="parent",
        counter_gt=state["counter"] > 1000,
        blob_changed=not blob_is(blob, 1),
        carried=h.stats["carried_pages"],
        random=random.random(),
    )
    for r in results:
        out(role="result", index=r.index, returncode=r.returncode, stdout=r.stdout.decode(),
            stderr=r.stderr.decode()[-2000:])


def chain(socks):
    gen = 0
    history = ["gen0"]
    blob = bytearray([0]) * (BLOB_MIB << 20)
    while True:
        t0 = time.monotonic()
        try:
            h = mitosis.fork_prepare()
        except mitosis.MitosisError as e:
            out(role="prepare-failed", gen=gen, error=str(e))
            os._exit(3)
        if h.is_child:
            parent = gen
            gen += 1
            ok = blob_is(blob, parent) and history == [f"gen{i}" for i in range(gen)]
            out(role="child", gen=gen, arg=h.arg.decode(), sees_parent=ok,
                history=list(history), socket=os.environ.get("MITOSIS_SOCKET"))
            if not ok:
                os._exit(4)
            history.append(f"gen{gen}")
            blob[:] = bytes([gen]) * len(blob)
            if gen >= len(socks):
                os._exit(0)
            continue
        prepare_ms = (time.monotonic() - t0) * 1000
        # The parent runs on and changes everything: none of it may reach the child.
        blob[:] = b"\xee" * len(blob)
        history.append("parent-wrote-after-prepare")
        r = mitosis.resume(h, arg=f"to-gen{gen + 1}", host=socks[gen])
        out(role="parent", gen=gen, prepare_ms=round(prepare_ms, 2), child_status=r.returncode,
            child_reason=r.reason)
        sys.stdout.write(r.stdout.decode())
        sys.stderr.write(r.stderr.decode())
        sys.stdout.flush()
        os._exit(0 if r.returncode == 0 else 5)


def forked(socks):
    h = mitosis.fork_prepare()
    if not h.is_child:
        r = mitosis.resume(h, host=socks[0])
        sys.stdout.write(r.stdout.decode())
        os._exit(r.returncode)
    pid = os.fork()
    if pid == 0:
        # A process the child forked: its memory comes through a handler nobody can flatten.
        try:
            mitosis.fork_prepare()
            out(role="grandchild", refused=None)
        except mitosis.DaemonError as e:
            out(role="grandchild", refused=str(e), kind=e.kind)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    out(role="child", grandchild_status=status)
    os._exit(0)


def nohost(sock):
    try:
        mitosis.fork_prepare(sock)
    except mitosis.NotOnMitosisHost as e:
        out(role="nohost", error=str(e))
    out(role="ran-on")


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    modes = {"fanout": fanout, "chain": chain, "forked": forked, "nohost": lambda s: nohost(s[0])}
    modes[mode](rest)
