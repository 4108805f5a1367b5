"""Fork from inside a function: ``fork_prepare()`` returns twice, like ``os.fork()``.

The caller asks its host's mitosisd to prepare *the caller itself* and blocks reading the
answer; the daemon captures it right there. In the caller the read returns the seed's handle.
In every child resumed from that point the same read is restarted on a descriptor children
never get (a connection to the daemon reaches outside the seed, so it is closed on purpose):
it fails with EBADF, and the child then reads its role from its stdin, where its resumer
wrote one header line ``MITOSIS-CHILD 1 INDEX LEN SOCKLEN``, LEN bytes of argument and
SOCKLEN bytes of the control socket of the daemon that made it (its host's, where its own
``fork_prepare`` and resumes go: it becomes ``MITOSIS_SOCKET``) before the function's own
input. See docs/workflows.md.

Under mitosis-platform (a workflow's stage) the process holds no daemon socket: the platform
gives it fd 3, a unix socket with ``MITOSIS-PLATFORM 1`` waiting on it, and ``fork_prepare``
asks the platform there instead (``PREPARE``; the platform prepares the process where it
runs and answers ``PREPARED TOKEN`` or ``ERROR KIND MESSAGE``). It returns twice just the
same; the parent's ``handle`` is then only a token (the platform keeps the seed's handle and
starts the next stage's children from it).

Only the standard library is used, so the package can be copied into any rootfs.
"""

import errno
import fcntl
import os
import socket
import stat
import struct
import sys
import threading

__all__ = [
    "Completed",
    "DaemonError",
    "HeaderError",
    "MitosisError",
    "NotOnMitosisHost",
    "Prepared",
    "child_header",
    "default_socket",
    "drop",
    "fork_prepare",
    "on_platform",
    "resume",
    "resume_many",
]

HEADER_MAGIC = b"MITOSIS-CHILD 1"
MAX_HEADER_LINE = 64
MAX_ARG = 64 << 20
# The daemon's connection is moved to this fd or above: clear of 0-2 and of the listening
# socket a child may get at 3, so a child's restarted read finds nothing there.
CONTROL_FD_MIN = 10
MAX_FRAME = 16 << 20
# The platform's channel (docs/workflows.md, "On the platform").
PLATFORM_FD = 3
PLATFORM_GREETING = b"MITOSIS-PLATFORM 1\n"
PLATFORM_MAX_LINE = 1024
# The channel this process took from fd 3 (moved to CONTROL_FD_MIN or above), if any.
_platform_fd = None

# Variant indices of the control protocol's enums (crates/mitosis-transport control.rs),
# postcard-encoded: a varint index, then the fields in order.
_REQ_DROP = 2
_REQ_RESUME = 3
_REQ_PREPARE_CALLER = 12
_REQ_FILL = 13
_REQ_PREPARE_PROFILED = 14
_EV_PREPARED = 0
_EV_DONE = 1
_EV_STARTED = 2
_EV_EXITED = 3
_EV_ERROR = 6
_ERROR_KINDS = [
    "BadRequest",
    "Denied",
    "NoSuchSeed",
    "WrongKey",
    "Unreachable",
    "SeedGone",
    "NoSuchProcess",
    "Unsupported",
    "Unavailable",
    "Failed",
]


class MitosisError(Exception):
    """Anything that went wrong preparing or resuming."""


class NotOnMitosisHost(MitosisError):
    """No daemon reachable: the program does not run on a mitosis host. It may run on."""


class DaemonError(MitosisError):
    """The daemon refused or failed the request: ``kind`` (e.g. "Denied") and its line."""

    def __init__(self, kind, message):
        super().__init__(f"mitosisd: {message} ({kind})")
        self.kind = kind
        self.message = message


class HeaderError(MitosisError):
    """A resumed child found no valid role header on its stdin."""


class Prepared:
    """What ``fork_prepare`` returns: in the parent ``handle`` (a secret: it opens this
    process's memory) and ``is_child`` False; in a child ``index`` and ``arg`` (bytes).
    Under the platform ``on_platform`` is True and the parent's ``handle`` is a token only.
    ``stats`` (parent): the daemon's figures for the prepare (``total_us``, ``stopped_us``,
    ``seed_pages``, ...), a dict, empty if not understood."""

    def __init__(self, handle=None, index=None, arg=None, on_platform=False, stats=None):
        self.handle = handle
        self.index = index
        self.arg = arg
        self.on_platform = on_platform
        self.stats = stats or {}

    @property
    def is_child(self):
        return self.handle is None

    def __repr__(self):
        if self.is_child:
            return f"Prepared(child index={self.index}, arg={self.arg!r})"
        return "Prepared(parent)"


class Completed:
    """A child that ran: like ``subprocess.CompletedProcess``. ``returncode`` is shell-style
    (128 + N if killed by signal N); ``reason`` says why the daemon killed it, if it did.
    ``started`` and ``faults``: the daemon's figures for its start (``cached``: the host had
    the seed's replica; ``total_us``, ...) and its page faults (``faults``, ``zero_faults``,
    ``fetches``, ``pages_fetched``, ``fetch_us``), as dicts (empty if not understood)."""

    def __init__(self, index, returncode, stdout, stderr, reason, started=None, faults=None):
        self.index = index
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.reason = reason
        self.started = started or {}
        self.faults = faults or {}

    def check(self):
        if self.returncode != 0:
            raise MitosisError(
                f"child {self.index} exited with {self.returncode}"
                + (f": {self.reason}" if self.reason else "")
                + (f"; stderr: {self.stderr[-500:]!r}" if self.stderr else "")
            )
        return self

    def __repr__(self):
        return (
            f"Completed(index={self.index}, returncode={self.returncode}, "
            f"stdout={self.stdout[:80]!r}, stderr={self.stderr[:80]!r})"
        )


def default_socket():
    """This host's daemon: ``MITOSIS_SOCKET``, else /run/mitosis/mitosisd.sock."""
    return os.environ.get("MITOSIS_SOCKET", "/run/mitosis/mitosisd.sock")


# -- postcard, the few shapes used here --------------------------------------------------


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _string(s):
    b = s.encode()
    return _varint(len(b)) + b


def _frame(body):
    return struct.pack("<I", len(body)) + body


class _Reader:
    def __init__(self, body):
        self.b = body
        self.i = 0

    def varint(self):
        n = shift = 0
        while True:
            if self.i >= len(self.b) or shift > 63:
                raise MitosisError("malformed answer from mitosisd")
            byte = self.b[self.i]
            self.i += 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return n

    def zigzag(self):
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def string(self):
        n = self.varint()
        s = self.b[self.i : self.i + n]
        if len(s) != n:
            raise MitosisError("malformed answer from mitosisd")
        self.i += n
        return s.decode(errors="replace")

    def option_string(self):
        return self.string() if self.varint() else None


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise MitosisError("mitosisd closed the connection")
        buf += chunk
    return bytes(buf)


def _recv_event(sock):
    (n,) = struct.unpack("<I", _recv_exact(sock, 4))
    if n > MAX_FRAME:
        raise MitosisError(f"answer of {n} bytes from mitosisd")
    r = _Reader(_recv_exact(sock, n))
    variant = r.varint()
    if variant == _EV_ERROR:
        kind = r.varint()
        kind = _ERROR_KINDS[kind] if kind < len(_ERROR_KINDS) else f"kind {kind}"
        raise DaemonError(kind, r.string())
    return variant, r


def _connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as e:
        s.close()
        raise NotOnMitosisHost(
            f"not on a mitosis host: cannot reach mitosisd at {path}: {e.strerror}"
        ) from None
    return s


# -- the child's side -------------------------------------------------------------------


def child_header(index, arg, socket_path=None):
    """What a resumer writes first on a child's stdin."""
    arg = _as_bytes(arg)
    sock = os.fsencode(socket_path) if socket_path else b""
    return HEADER_MAGIC + b" %d %d %d\n" % (index, len(arg), len(sock)) + arg + sock


def _read_line(fd, most, ended, too_long):
    """One line from ``fd`` (without its newline), read byte by byte so that nothing after it
    is taken; raises ``ended`` if ``fd`` ends first, ``too_long`` past ``most`` bytes."""
    line = bytearray()
    while True:
        b = os.read(fd, 1)
        if not b:
            raise ended
        if b == b"\n":
            return line
        line += b
        if len(line) > most:
            raise too_long


def _read_role(fd=0):
    """Reads the role header from ``fd`` byte by byte, so that nothing after it is taken."""
    line = _read_line(
        fd,
        MAX_HEADER_LINE,
        HeaderError("resumed child: stdin ended before its role header"),
        HeaderError("resumed child: role header line too long"),
    )
    words = bytes(line).split(b" ")
    if len(words) != 5 or b" ".join(words[:2]) != HEADER_MAGIC:
        raise HeaderError(f"resumed child: {bytes(line)!r} is not a role header")
    try:
        index, length, sock_len = int(words[2]), int(words[3]), int(words[4])
    except ValueError:
        raise HeaderError(f"resumed child: {bytes(line)!r} is not a role header") from None
    if index < 0 or not 0 <= length <= MAX_ARG or not 0 <= sock_len <= 4096:
        raise HeaderError(f"resumed child: bad index or length in {bytes(line)!r}")
    arg = _read_exact(fd, length)
    sock = _read_exact(fd, sock_len)
    return index, arg, (os.fsdecode(sock) if sock else None)


def _read_exact(fd, n):
    got = bytearray()
    while len(got) < n:
        chunk = os.read(fd, n - len(got))
        if not chunk:
            raise HeaderError("resumed child: stdin ended inside its role header")
        got += chunk
    return bytes(got)


# -- under the platform -----------------------------------------------------------------


def _take_platform_channel():
    """The platform's channel if this process was given one: fd 3, a unix stream socket
    with the greeting waiting on it. Takes it (moved to fd CONTROL_FD_MIN or above, the
    greeting read), so a child given fd 3 of its own never reads its parent's."""
    global _platform_fd
    try:
        if not stat.S_ISSOCK(os.fstat(PLATFORM_FD).st_mode):
            return _platform_fd
        probe = socket.socket(fileno=os.dup(PLATFORM_FD))
    except OSError:
        return _platform_fd
    try:
        if probe.family != socket.AF_UNIX or probe.type != socket.SOCK_STREAM:
            return _platform_fd
        if probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return _platform_fd
        try:
            waiting = probe.recv(len(PLATFORM_GREETING), socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            return _platform_fd
        if waiting != PLATFORM_GREETING:
            return _platform_fd
    finally:
        probe.close()
    fd = fcntl.fcntl(PLATFORM_FD, fcntl.F_DUPFD_CLOEXEC, CONTROL_FD_MIN)
    os.close(PLATFORM_FD)
    os.read(fd, len(PLATFORM_GREETING))
    _platform_fd = fd
    return fd


def on_platform():
    """Whether this process runs a mitosis-platform workflow stage (and prepares itself
    through the platform)."""
    return _take_platform_channel() is not None


def _become_child():
    """What a child does when its ``fork_prepare`` returns: reads its role from stdin, takes
    its host's daemon as its own (its own ``fork_prepare`` and resumes go there), and reseeds
    the ``random`` module as ``os.fork`` does in its child, or every child of one seed would
    draw the same numbers. Returns the index and argument."""
    index, arg, sock = _read_role(0)
    if sock:
        os.environ["MITOSIS_SOCKET"] = sock
    rand = sys.modules.get("random")
    if rand is not None:
        rand.seed()
    return index, arg


def _fork_prepare_platform(fd):
    global _platform_fd
    before = os.getpid()
    try:
        os.write(fd, b"PREPARE\n")
    except OSError as e:
        raise MitosisError(f"the platform's channel: {e}") from None
    line = bytearray()
    gone = False
    # The prepare point: the platform has the process captured while it waits here.
    try:
        line = _read_line(
            fd,
            PLATFORM_MAX_LINE,
            MitosisError("the platform closed its channel"),
            MitosisError("the platform's answer is too long"),
        )
    except OSError as e:
        if e.errno != errno.EBADF and os.getpid() == before:
            raise MitosisError(f"the platform's channel: {e}") from None
        gone = True
    if gone:
        # A child: the channel was its parent's (the fd is free or someone else's now).
        _platform_fd = None
        index, arg = _become_child()
        return Prepared(index=index, arg=arg, on_platform=True)
    words = bytes(line).decode(errors="replace").split(" ", 2)
    if words[0] == "PREPARED" and len(words) == 2:
        return Prepared(handle=words[1], on_platform=True)
    if words[0] == "ERROR" and len(words) == 3:
        raise DaemonError(words[1], words[2])
    raise MitosisError(f"unexpected answer from the platform: {bytes(line)!r}")


# -- the API ----------------------------------------------------------------------------


def fork_prepare(socket_path=None, profile=None):
    """Prepares this process as a seed and returns twice: in the caller a ``Prepared`` with
    ``handle``; in every child resumed from it one with ``is_child``, ``index`` and ``arg``.

    With ``profile`` (a name for the program: letters, digits and ``-_.:/@``), the first
    children's hosts get the pages that earlier seeds of the same profile had their children
    touch (``stats["carried_pages"]`` of them), so a program prepared again, such as a
    workflow's producer run after run, starts its first children with fewer page faults.

    The caller runs on once prepared; what it writes later never reaches its children.
    Raises ``NotOnMitosisHost`` when no daemon is reachable (the program may run on), and
    ``DaemonError`` when the daemon refuses (e.g. a process it cannot fork).

    Under the platform (a workflow's stage, fd 3: see the module's doc) and with no
    ``socket_path``, the platform is asked instead of a daemon.
    """
    if socket_path is None:
        channel = _take_platform_channel()
        if channel is not None:
            return _fork_prepare_platform(channel)
    path = socket_path or default_socket()
    before = os.getpid()
    s = _connect(path)
    try:
        fd = fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, CONTROL_FD_MIN)
    finally:
        s.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd)
    try:
        if profile is None:
            s.sendall(_frame(_varint(_REQ_PREPARE_CALLER)))
        else:
            # PrepareProfiled { pid: None, profile }: an absent Option is one zero byte.
            s.sendall(_frame(_varint(_REQ_PREPARE_PROFILED) + b"\x00" + _string(str(profile))))
        # The prepare point: the daemon captures this process while it waits here.
        try:
            variant, r = _recv_event(s)
            gone = False
        except OSError as e:
            if e.errno != errno.EBADF and os.getpid() == before:
                raise MitosisError(f"mitosisd connection: {e}") from None
            gone = True
    except BaseException:
        if os.getpid() == before:
            s.close()
        else:
            s.detach()
        raise
    if gone or os.getpid() != before:
        # A child: the fd number is free or someone else's; never close it.
        s.detach()
        index, arg = _become_child()
        return Prepared(index=index, arg=arg)
    s.close()
    if variant != _EV_PREPARED:
        raise MitosisError(f"unexpected answer {variant} from mitosisd")
    handle = r.string()
    return Prepared(handle=handle, stats=_fields(r, _PREPARE_STATS))


def _as_bytes(x):
    if x is None:
        return b""
    if isinstance(x, str):
        return x.encode()
    return bytes(x)


def _handle_of(handle):
    if isinstance(handle, Prepared):
        if handle.is_child:
            raise MitosisError("a child's Prepared has no handle: prepare it again")
        if handle.on_platform:
            raise MitosisError(
                "prepared through the platform: the workflow's next stage starts its children "
                "(a `fork` stage), not resume()"
            )
        return handle.handle
    return str(handle)


def _read_all(fd, into):
    with os.fdopen(fd, "rb", buffering=0) as f:
        while True:
            chunk = f.read(65536)
            if not chunk:
                return
            into.append(chunk)


def _write_all(fd, data):
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            view = memoryview(data)
            while view:
                n = f.write(view)
                view = view[n:]
    except BrokenPipeError:
        pass  # the child exited without reading all of it: its business


def resume(handle, arg=b"", host=None, index=0, input=b""):
    """Starts child ``index`` of ``handle`` (a ``Prepared`` or a handle string) and waits for
    it, like ``subprocess.run``: returns ``Completed`` with its output and status.

    ``arg`` (bytes or str) is what the child's ``fork_prepare`` returns as ``arg``; ``input``
    follows it on the child's stdin. ``host`` is the control socket of the daemon whose host
    runs the child (None: this host's).
    """
    h = _handle_of(handle)
    host = host or default_socket()
    s = _connect(host)
    pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]
    (in_r, in_w), (out_r, out_w), (err_r, err_w) = pipes
    try:
        body = _varint(_REQ_RESUME) + _string(h) + b"\x00"  # memory_mib: None
        socket.send_fds(s, [_frame(body)], [in_r, out_w, err_w])
    except BaseException:
        for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
            os.close(fd)
        s.close()
        raise
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    out, err = [], []
    threads = [
        threading.Thread(target=_write_all, args=(in_w, child_header(index, arg, host) + _as_bytes(input))),
        threading.Thread(target=_read_all, args=(out_r, out)),
        threading.Thread(target=_read_all, args=(err_r, err)),
    ]
    for t in threads:
        t.daemon = True
        t.start()
    try:
        with s:
            variant, r = _recv_event(s)
            if variant != _EV_STARTED:
                raise MitosisError(f"unexpected answer {variant} from mitosisd")
            started = _fields(r, _RESUME_STATS, skip_pid=True)
            variant, r = _recv_event(s)
            if variant != _EV_EXITED:
                raise MitosisError(f"unexpected answer {variant} from mitosisd")
            status = r.zigzag()
            reason = r.option_string()
            faults = _fields(r, _FAULT_STATS)
    finally:
        for t in threads[1:]:
            t.join()
    return Completed(index, status, b"".join(out), b"".join(err), reason, started, faults)


# The fields of ResumeStats and FaultStats (crates/mitosis-transport control.rs), in order;
# "?" marks a bool. Only reported, never relied on: a layout this does not know gives {}.
_RESUME_STATS = ["cached?", "attach_us", "descriptor_us", "plan_us", "build_us", "spawn_us",
                 "restore_us", "eager_pages", "working_set_pages", "working_set_us",
                 "install_us", "pages_wait_us", "fork_us", "container_us",
                 "container_pooled?", "join_us", "total_us"]
_PREPARE_STATS = [
    "warm_us",
    "stopped_us",
    "total_us",
    "vmas",
    "seed_pages",
    "descriptor_bytes",
    "carried_pages",
]
_FAULT_STATS = ["faults", "zero_faults", "fetches", "pages_fetched", "fetch_us"]


def _fields(r, names, skip_pid=False):
    try:
        if skip_pid:
            r.zigzag()
        got = {}
        for name in names:
            if name.endswith("?"):
                got[name[:-1]] = bool(r.varint())
            else:
                got[name] = r.varint()
        return got
    except MitosisError:
        return {}


def drop(handle, socket_path=None):
    """Drops the seed behind ``handle`` (a ``Prepared`` or a handle string) on the daemon
    that prepared it (``socket_path``, default this host's): its frozen copy of the process
    is freed and no child can be resumed from it any more. Children already running go on."""
    _request_done(socket_path, _REQ_DROP, handle)


def fill(handle, host=None):
    """Builds the replica of ``handle``'s seed on ``host`` (a control socket, None: this
    host's) if it has none, and brings every page of the seed into it that its cache has room
    for; returns once they are in. The children forked there next share those pages, each
    holding only what it writes: for children that each read most of the seed."""
    _request_done(host, _REQ_FILL, handle)


def _request_done(socket_path, request, handle):
    """Sends ``request`` (a variant taking a handle) and waits for ``Done``."""
    with _connect(socket_path or default_socket()) as s:
        s.sendall(_frame(_varint(request) + _string(_handle_of(handle))))
        variant, _ = _recv_event(s)
    if variant != _EV_DONE:
        raise MitosisError(f"unexpected answer {variant} from mitosisd")


def _each(fn, items):
    """``fn(item)`` for every item at once, on threads; the first exception is raised after
    all are done. Returns the results in order."""
    results = [None] * len(items)

    def run(i):
        try:
            results[i] = fn(items[i])
        except BaseException as e:  # reported in order below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def resume_many(handle, args, host=None, fill_first=False, first_index=0):
    """Starts one child per item of ``args`` at once (child i gets ``args[i]``, index
    ``first_index + i``) and returns their ``Completed`` in order. ``host``: one socket for
    all, or a list, one each.
    ``fill_first``: first fill each host's replica with the whole seed (``fill``), so that
    children which all read most of the seed share its pages rather than each copying them."""
    args = list(args)
    hosts = host if isinstance(host, (list, tuple)) else [host] * len(args)
    if fill_first:
        _each(lambda where: fill(handle, host=where), list(dict.fromkeys(hosts)))
    return _each(
        lambda i: resume(handle, arg=args[i], host=hosts[i], index=first_index + i),
        list(range(len(args))),
    )
