#!/usr/bin/env python3
"""The JSON benchmark seed: its warm state is a large parsed JSON document.

Start-up generates a deterministic document (RECORDS records, about 15 MB of JSON text) and
parses it with json.loads. Every request queries a window of it (WINDOW records chosen by n)
and serializes what it found.

    {"n": 5}  ->  {"n": 5, "first": ..., "matches": ..., "score": ..., "bytes": ..., "crc": ..., "pid": ...}

Protocol and modes: see seedlib.py.
"""

import json
import sys
import zlib

import seedlib

RECORDS = 80000
WINDOW = 2000  # records a request looks at
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def document_text():
    """The document as JSON text (built as Python objects, then dumped)."""
    records = []
    for i in range(RECORDS):
        records.append(
            {
                "id": i,
                "name": "record-%06d" % i,
                "group": i % 97,
                "score": ((i * 7919) % 10007) / 100.0,
                "tags": [WORDS[(i + k) % len(WORDS)] for k in range(i % 4 + 1)],
                "address": {"street": "%d Main St" % (i % 1000), "zip": "%05d" % (i * 13 % 100000)},
                "history": [(i * k) % 101 for k in range(6)],
            }
        )
    return json.dumps({"version": 3, "records": records})


def build(_opts):
    return json.loads(document_text())


def answer(doc, request):
    """Records of a window of the document that carry tag n, summed and serialized."""
    n = int(request["n"])
    records = doc["records"]
    start = (n * 7919) % (len(records) - WINDOW)
    tag = WORDS[n % len(WORDS)]
    matches = [r for r in records[start : start + WINDOW] if tag in r["tags"]]
    text = json.dumps(matches[:40], sort_keys=True)
    return {
        "n": n,
        "first": start,
        "matches": len(matches),
        "score": round(sum(r["score"] for r in matches), 6),
        "bytes": len(text),
        "crc": zlib.crc32(text.encode()),
    }


if __name__ == "__main__":
    sys.exit(seedlib.main("json_fn.py", build, answer))
