"""A function for mitosis-platform workflows (docs/workflows.md, "On the platform").

Every instance reads one JSON document on stdin (a stage forked from an earlier one gets it
as its ``fork_prepare`` argument instead): ``{"workflow", "run_id", "stage", "index",
"count", "input", "after"}``. What it does depends on its input's ``role``:

- ``producer``: builds in-memory state (a table and a blob of ``mib`` MiB from ``seed``),
  calls ``mitosis.fork_prepare()`` and answers; then changes its state, which the children
  must never see. In every child the call returns again: the child runs one validation
  ``rule`` (its ``arg``'s ``input``) over the state it inherited and answers with what it saw.
- ``aggregate``: combines the results of the stages it runs after (fan-in).
- ``forked_asks``: a process it forks asks to be prepared (refused: not the stage's process).
- anything else: echoes its document.

A rule may ask to fail (``{"fail": N}``: exit N) or to take long (``{"sleep": S}``).
"""

import hashlib
import json
import os
import sys
import time

import mitosis


def read_all(fd=0):
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def answer(value):
    sys.stdout.write(json.dumps(value, sort_keys=True))
    sys.stdout.flush()
    os._exit(0)


# Warm: the seed blocks here; each call's child reads its own document.
doc = json.loads(read_all() or b"null")
inp = doc.get("input") or {}
if not isinstance(inp, dict):
    inp = {}

if inp.get("role") == "producer":
    seed = int(inp.get("seed", 1))
    rows = int(inp.get("rows", 10000))
    table = [(i * seed) % 1009 for i in range(rows)]
    blob = bytearray(hashlib.sha256(str(seed).encode()).digest()) * ((int(inp.get("mib", 4)) << 20) // 32)
    digest = hashlib.sha256(blob).hexdigest()
    counter = 1
    words = ["before"]
    t0 = time.monotonic()
    h = mitosis.fork_prepare()
    if h.is_child:
        child = json.loads(h.arg)
        rule = child.get("input") or {}
        if not isinstance(rule, dict):
            rule = {}
        if rule.get("refine"):
            # A child that is a seed in turn: it changes its state and prepares again; its
            # own children (a later stage) see this state, not the producer's nor later.
            counter = 10
            words.append("refined")
            h2 = mitosis.fork_prepare()
            if h2.is_child:
                grand = json.loads(h2.arg)
                answer(
                    {
                        "role": "grandchild",
                        "index": h2.index,
                        "stage": grand["stage"],
                        "counter": counter,
                        "words": words,
                        "blob_ok": hashlib.sha256(blob).hexdigest() == digest,
                        "sum": sum(table),
                        "hostname": os.uname().nodename,
                    }
                )
            words.append("after-refine")
            answer({"role": "refined", "token": h2.handle, "index": h.index})
        if "sleep" in rule:
            time.sleep(rule["sleep"])
        if "fail" in rule:
            sys.stderr.write(f"rule {child['index']} fails on purpose\n")
            sys.stderr.flush()
            os._exit(int(rule["fail"]))
        lo, hi = rule.get("lo", 0), rule.get("hi", rows)
        answer(
            {
                "role": "validator",
                "index": h.index,
                "stage": child["stage"],
                "rule": rule,
                "sum": sum(table[lo:hi]),
                "counter": counter,
                "words": words,
                "blob_ok": hashlib.sha256(blob).hexdigest() == digest,
                "blob_head_changed": bytes(blob[:8]) == b"CHANGED!",
                "producer_result": child["after"].get("load"),
                # A container of the function's bundle (its UTS namespace, its rootfs).
                "hostname": os.uname().nodename,
                "in_rootfs": os.path.exists("/opt/mitosis/image_fn.py"),
            }
        )
    prepare_ms = (time.monotonic() - t0) * 1000
    # The parent runs on and changes its state: no child may see any of it.
    counter = 2
    words.append("after")
    blob[:8] = b"CHANGED!"
    answer(
        {
            "role": "producer",
            "on_platform": h.on_platform,
            "token": h.handle,
            "digest": digest,
            "prepare_ms": round(prepare_ms, 3),
        }
    )

if inp.get("role") == "aggregate":
    after = doc.get("after") or {}
    validators = [r for results in after.values() for r in results if isinstance(r, dict)]
    answer(
        {
            "role": "aggregate",
            "count": len(validators),
            "indexes": sorted(r.get("index") for r in validators),
            "total": sum(r.get("sum", 0) for r in validators),
            "all_ok": all(
                r.get("blob_ok") and not r.get("blob_head_changed") and r.get("counter") == 1
                for r in validators
            ),
        }
    )

if inp.get("role") == "forked_asks":
    # A process this one forks shares its channel, but only this one may prepare itself.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            mitosis.fork_prepare()
            said = {"prepared": True}
        except mitosis.MitosisError as e:
            said = {"error": str(e), "kind": getattr(e, "kind", None)}
        os.write(w, json.dumps(said).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    answer({"role": "forked_asks", "subprocess": json.loads(read_all(r))})

if inp.get("fail"):
    sys.stderr.write("failing on purpose\n")
    sys.stderr.flush()
    os._exit(int(inp["fail"]))

answer({"role": "echo", "doc": doc, "on_platform": mitosis.on_platform()})
