#!/usr/bin/env python3
"""An asyncio seed: an event loop reading JSON lines from stdin, work done on an executor thread.

    {"n": 5}  ->  {"n": 5, "square": 25, "digest": "...", "threads": 2, "pid": ...}

The loop wakes up through its self-pipe, a socketpair inside the process: the executor thread's
result (call_soon_threadsafe) and a signal (add_signal_handler, through set_wakeup_fd) both
reach the loop as a byte written to it. A SIGUSR1 writes the line ``usr1``. The executor's one
worker thread is started before ``ready``, so a child has the seed's two threads.

    asyncio_fn.py          serve lines until EOF, after printing "ready <pid>"
    asyncio_fn.py --once   answer one line and exit (a cold run, for the expected answers)
"""

import asyncio
import concurrent.futures
import hashlib
import json
import os
import signal
import sys


def work(n):
    return {"n": n, "square": n * n, "digest": hashlib.sha256(str(n).encode()).hexdigest()[:16]}


async def serve(once):
    loop = asyncio.get_running_loop()
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    await loop.run_in_executor(executor, work, 0)
    loop.add_signal_handler(signal.SIGUSR1, lambda: os.write(1, b"usr1\n"))
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    if not once:
        print("ready", os.getpid(), flush=True)
    while line := await reader.readline():
        answer = await loop.run_in_executor(executor, work, int(json.loads(line)["n"]))
        answer.update(threads=len(os.listdir("/proc/self/task")), pid=os.getpid())
        os.write(1, (json.dumps(answer, sort_keys=True) + "\n").encode())
        if once:
            break


if __name__ == "__main__":
    asyncio.run(serve("--once" in sys.argv[1:]))
