"""The FINRA trade-validation workflow: a producer loads market data and a portfolio, N
validators each run one audit rule (rules.py) over the whole table, an aggregator combines
their verdicts. Every line printed on stdout is one JSON object.

Modes:

  reference --data-mib X --validators N
      every validator's rule in this one process, one after the other: the verdicts the
      other ways must reproduce.
  run --method M --data-mib X --validators N [...]
      the producer: loads the state, hands it to N validators by method M, waits for their
      verdicts and aggregates them. Methods:
        mitosis  mitosis.fork_prepare() after loading; the validators are its children,
                 resumed across hosts (--hosts: the daemons' control sockets, round robin),
                 each told its rule by the resume argument; the seed is dropped at the end.
                 --profile NAME: prepared under that profile, so the validators' hosts get
                 what earlier runs' validators touched first before they start.
        redis    the state pickled into Redis (--redis HOST:PORT); each validator is a fresh
                 Python process on its host (--netns: the hosts' network namespaces, round
                 robin, entered with nsenter) that imports pandas, fetches, unpickles, runs.
        files    the same through a pickle file in --shared-dir.
        fork     local os.fork() children of the producer on its own host (the floor).
      --fail I[,J]: validator I runs a broken rule (a column the table lacks): the run then
      reports which validator failed and why, and exits 3.
  validate --source redis://HOST:PORT/KEY|file://PATH --spec RULE:LEVEL --index I
      one baseline validator (started by `run`).

The result line of `run` ({"role": "result", ...}) carries the total time from the moment
the state is loaded (t0) to the aggregated report, the time from t0 to the first
validator's first instruction, each validator's phases and memory, and the report.
"""

import time

T_PROCESS = time.monotonic()

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import select  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402

# One thread per process everywhere (2 shared cores; a seed with BLAS threads is
# multi-threaded for nothing), the same for every method.
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
            "NUMEXPR_MAX_THREADS"):
    os.environ.setdefault(var, "1")

T_BEFORE_IMPORT = time.monotonic()
import numpy as np  # noqa: E402,F401
import pandas as pd  # noqa: E402

import rules  # noqa: E402

T_IMPORTED = time.monotonic()
HERE = os.path.dirname(os.path.abspath(__file__))


def out(**kv):
    sys.stdout.write(json.dumps(kv) + "\n")
    sys.stdout.flush()


def ms(a, b):
    return round((b - a) * 1000.0, 3)


def memory():
    """This process's memory (KiB) from smaps_rollup: what a validator costs the host."""
    got = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss", "Private_Dirty", "Private_Clean", "Shared_Clean",
                           "Shared_Dirty", "Anonymous"):
                    got[key] = int(rest.split()[0])
    except OSError:
        pass
    return got


def settle():
    """Leaves the heap as a seed's (examples/python/seedlib.py settle), for every method
    alike: the loaded objects move to the collector's permanent generation, so collections
    in a child never walk (and write) them; the allocator hands the pages it freed while
    loading (the generator's temporaries) back to the kernel, so a child's new arrays land
    on fresh zero pages instead of pages that would come from the producer."""
    gc.collect()
    gc.freeze()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def load(data_mib, seed):
    t = time.monotonic()
    market = rules.make_market(data_mib, seed)
    portfolio = rules.make_portfolio(seed)
    mib = market.memory_usage(deep=True).sum() / (1 << 20)
    return market, portfolio, ms(t, time.monotonic()), round(float(mib), 2)


def validate_here(index, spec, market, portfolio, started, phases):
    """Runs validator ``index`` in this process (a child of the producer, or a baseline
    process that fetched the state); the one JSON line it prints."""
    t = time.monotonic()
    verdict = rules.run_rule(spec, market, portfolio)
    done = time.monotonic()
    phases = dict(phases, rule_ms=ms(t, done))
    return {"role": "verdict", "index": index, "spec": spec, "verdict": verdict,
            "t_start": started, "t_done": done, "phases": phases, "mem": memory(), "pid": os.getpid()}


# -- reference ------------------------------------------------------------------------------


def reference(a):
    market, portfolio, load_ms, mib = load(a.data_mib, a.seed)
    t0 = time.monotonic()
    verdicts = {}
    for i, spec in enumerate(rules.specs(a.validators)):
        verdicts[i] = rules.run_rule(spec, market, portfolio)
    report = rules.aggregate(verdicts)
    out(role="reference", data_mib=mib, rows=len(market), load_ms=load_ms,
        total_ms=ms(t0, time.monotonic()), report=report,
        verdicts=[verdicts[i] for i in sorted(verdicts)])


# -- the producer --------------------------------------------------------------------------


class Failed(Exception):
    pass


def parse_verdict(index, spec, returncode, stdout, stderr, reason=None):
    """A validator's outcome: its verdict line, or why it failed (which one and why)."""
    if returncode == 0:
        for line in stdout.decode(errors="replace").splitlines():
            try:
                v = json.loads(line)
            except ValueError:
                continue
            if v.get("role") == "verdict" and v.get("index") == index:
                return v, None
        why = "exited 0 without a verdict line"
    else:
        why = f"exited with status {returncode}"
        if reason:
            why += f" ({reason})"
    tail = stderr.decode(errors="replace").strip().splitlines()
    last = tail[-1] if tail else ""
    return None, {"index": index, "spec": spec, "why": why, "error": last,
                  "stderr": "\n".join(tail[-15:])}


def run_mitosis(a, specs, market, portfolio, clock):
    import mitosis

    hosts = a.hosts.split(",")
    clock["t_prepare"] = time.monotonic()
    h = mitosis.fork_prepare(profile=a.profile or None)
    if h.is_child:
        # A validator: the producer's memory, as it was at the prepare point.
        started = time.monotonic()
        index = h.index
        spec = h.arg.decode()
        try:
            v = validate_here(index, spec, market, portfolio, started,
                              {"state_ms": 0.0})
            out(**v)
            code = 0
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            code = 1
        sys.stdout.flush()
        os._exit(code)
    clock["t_prepared"] = time.monotonic()
    clock["prepare"] = h.stats
    where = [hosts[i % len(hosts)] for i in range(len(specs))]
    try:
        if a.method == "mitosis-staged":
            # One validator per host first: its faults fill the host's replica, from which
            # the others are then forked with those pages shared instead of each fetching
            # (and privately copying) them.
            first = min(len(hosts), len(specs))
            done = mitosis.resume_many(h, specs[:first], host=where[:first])
            rest = mitosis.resume_many(h, specs[first:], host=where[first:],
                                       first_index=first)
            done = done + rest
        elif a.method == "mitosis-filled":
            # Each host's replica takes in the whole producer first; every validator is then
            # forked from it, sharing the table's pages instead of copying what it faults in.
            done = mitosis.resume_many(h, specs, host=where, fill_first=True)
        else:
            done = mitosis.resume_many(h, specs, host=where)
    finally:
        # The seed holds a frozen copy of this process: drop it with the workflow.
        try:
            mitosis.drop(h)
        except mitosis.MitosisError as e:
            out(role="warning", what=f"dropping the seed: {e}")
    outcomes = []
    for c in done:
        v, f = parse_verdict(c.index, specs[c.index], c.returncode, c.stdout, c.stderr, c.reason)
        if v:
            # The daemon's figures: its start of the child, and the child's page faults.
            v["daemon"] = {"start": c.started, "faults": c.faults}
        outcomes.append((v, f))
    return outcomes


def run_fork(a, specs, market, portfolio, clock):
    clock["t_prepare"] = clock["t_prepared"] = time.monotonic()
    kids = []
    for i, spec in enumerate(specs):
        r_out, w_out = os.pipe()
        r_err, w_err = os.pipe()
        pid = os.fork()
        if pid == 0:
            started = time.monotonic()
            os.close(r_out)
            os.close(r_err)
            os.dup2(w_out, 1)
            os.dup2(w_err, 2)
            code = 0
            try:
                out(**validate_here(i, spec, market, portfolio, started, {"state_ms": 0.0}))
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        os.close(w_out)
        os.close(w_err)
        kids.append((i, pid, r_out, r_err))
    return [collect_pipes(i, specs[i], pid, ro, re) for i, pid, ro, re in kids]


def collect_pipes(index, spec, pid, r_out, r_err):
    outs = {r_out: [], r_err: []}
    open_fds = [r_out, r_err]
    while open_fds:
        ready, _, _ = select.select(open_fds, [], [])
        for fd in ready:
            chunk = os.read(fd, 65536)
            if chunk:
                outs[fd].append(chunk)
            else:
                open_fds.remove(fd)
                os.close(fd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        code = 128 - code
    return parse_verdict(index, spec, code, b"".join(outs[r_out]), b"".join(outs[r_err]))


def spawn_validators(a, specs, source):
    """Fresh Python processes, validator i in host (i mod hosts)'s network namespace; their
    outcomes in order."""
    netns = a.netns.split(",")
    procs = []
    for i, spec in enumerate(specs):
        cmd = ["nsenter", f"--net={netns[i % len(netns)]}", a.python or sys.executable,
               os.path.join(HERE, "finra.py"), "validate", "--source", source, "--spec", spec,
               "--index", str(i)]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    results = [None] * len(procs)

    def wait(i):
        o, e = procs[i].communicate()
        results[i] = parse_verdict(i, specs[i], procs[i].returncode, o, e)

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(len(procs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run_redis(a, specs, market, portfolio, clock):
    import redis

    host, port = a.redis.rsplit(":", 1)
    key = f"finra:{os.getpid()}:{time.monotonic_ns()}"
    clock["t_prepare"] = time.monotonic()
    r = redis.Redis(host=host, port=int(port))
    r.set(key, pickle.dumps((market, portfolio), protocol=pickle.HIGHEST_PROTOCOL))
    clock["t_prepared"] = time.monotonic()
    try:
        return spawn_validators(a, specs, f"redis://{host}:{port}/{key}")
    finally:
        r.delete(key)


def run_files(a, specs, market, portfolio, clock):
    path = os.path.join(a.shared_dir, f"finra-{os.getpid()}-{time.monotonic_ns()}.pkl")
    clock["t_prepare"] = time.monotonic()
    with open(path, "wb") as f:
        pickle.dump((market, portfolio), f, protocol=pickle.HIGHEST_PROTOCOL)
    clock["t_prepared"] = time.monotonic()
    try:
        return spawn_validators(a, specs, f"file://{path}")
    finally:
        os.unlink(path)


METHODS = {"mitosis": run_mitosis, "mitosis-staged": run_mitosis,
           "mitosis-filled": run_mitosis, "fork": run_fork,
           "redis": run_redis, "files": run_files}


def run(a):
    market, portfolio, load_ms, mib = load(a.data_mib, a.seed)
    fail = {int(x) for x in a.fail.split(",")} if a.fail else set()
    specs = rules.specs(a.validators, fail)
    settle()
    clock = {}
    t0 = time.monotonic()
    outcomes = METHODS[a.method](a, specs, market, portfolio, clock)
    verdicts = {v["index"]: v["verdict"] for v, _ in outcomes if v}
    failures = [f for _, f in outcomes if f]
    report = rules.aggregate(verdicts) if not failures else None
    t_end = time.monotonic()
    ok = [v for v, _ in outcomes if v]
    first = min((v["t_start"] for v in ok), default=None)
    for f in failures:
        out(role="failed", method=a.method, **f)
    out(role="result", method=a.method, validators=a.validators, data_mib=mib, rows=len(market),
        load_ms=load_ms, total_ms=ms(t0, t_end),
        handoff_ms=ms(clock["t_prepare"], clock["t_prepared"]), prepare=clock.get("prepare"),
        first_start_ms=ms(t0, first) if first is not None else None,
        last_done_ms=ms(t0, max((v["t_done"] for v in ok), default=t0)),
        report=report, failures=len(failures),
        validators_detail=[{"index": v["index"], "spec": v["spec"], "phases": v["phases"],
                            "start_ms": ms(t0, v["t_start"]), "mem": v["mem"],
                            "daemon": v.get("daemon")} for v in ok],
        verdicts=[verdicts[i] for i in sorted(verdicts)])
    return 3 if failures else 0


# -- a baseline validator ---------------------------------------------------------------------


def validate(a):
    started = T_PROCESS
    phases = {"import_ms": ms(T_BEFORE_IMPORT, T_IMPORTED)}
    t = time.monotonic()
    if a.source.startswith("redis://"):
        import redis

        hostport, key = a.source[len("redis://"):].split("/", 1)
        host, port = hostport.rsplit(":", 1)
        blob = redis.Redis(host=host, port=int(port)).get(key)
        if blob is None:
            raise SystemExit(f"validator {a.index}: no key {key} in Redis")
    elif a.source.startswith("file://"):
        with open(a.source[len("file://"):], "rb") as f:
            blob = f.read()
    else:
        raise SystemExit(f"validator {a.index}: unknown source {a.source}")
    t2 = time.monotonic()
    phases["fetch_ms"] = ms(t, t2)
    market, portfolio = pickle.loads(blob)
    del blob
    t3 = time.monotonic()
    phases["unpickle_ms"] = ms(t2, t3)
    phases["state_ms"] = ms(t, t3)
    out(**validate_here(a.index, a.spec, market, portfolio, started, phases))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    for name in ("reference", "run"):
        s = sub.add_parser(name)
        s.add_argument("--data-mib", type=float, default=16)
        s.add_argument("--validators", type=int, default=8)
        s.add_argument("--seed", type=int, default=42)
    r = sub.choices["run"]
    r.add_argument("--method", choices=sorted(METHODS), required=True)
    r.add_argument("--hosts", default="", help="mitosis: daemons' control sockets")
    r.add_argument("--netns", default="", help="redis/files: the hosts' netns paths")
    r.add_argument("--redis", default="", help="redis: HOST:PORT")
    r.add_argument("--shared-dir", default="/tmp", help="files: where the pickle goes")
    r.add_argument("--python", default="", help="the validators' interpreter")
    r.add_argument("--fail", default="", help="validators (indices) given a broken rule")
    r.add_argument("--profile", default="",
                   help="mitosis: prepare under this profile (earlier runs' start carried over)")
    v = sub.add_parser("validate")
    v.add_argument("--source", required=True)
    v.add_argument("--spec", required=True)
    v.add_argument("--index", type=int, required=True)
    a = p.parse_args()
    if a.mode == "run":
        need = {"mitosis": "hosts", "mitosis-staged": "hosts", "mitosis-filled": "hosts",
                "redis": "redis"}.get(a.method)
        if need and not getattr(a, need):
            p.error(f"--method {a.method} needs --{need}")
        if a.method in ("redis", "files") and not a.netns:
            p.error(f"--method {a.method} needs --netns")
        sys.exit(run(a))
    if a.mode == "reference":
        reference(a)
    else:
        validate(a)


if __name__ == "__main__":
    main()
