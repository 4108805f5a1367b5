#!/usr/bin/env python3
"""A warmed HTTP function: its child serves requests on a socket the resumer hands it.

Start-up imports http.server and builds a table (the primes below 200000), answers one
request internally, prints ``ready`` and blocks reading one line from stdin with read(0):

    serve N   takes file descriptor 3 as its listening socket (systemd's socket-activation
              convention: `mitosis resume --listen ADDR HANDLE` binds ADDR and passes it as
              fd 3), answers N HTTP GET requests on it, then exits 0. If no request comes
              for 60 s it gives up and exits 1.

The answer to `GET PATH` is one JSON line, "pid" last:

    {"path": PATH, "prime": ..., "primes_below": ..., "digest": ..., "pid": ...}

Other modes:
  --answer PATH   print the body for PATH and exit (a cold run computes the same numbers,
                  which is what a child's answers are checked against).
"""

import hashlib
import http.server
import json
import os
import socket
import sys

LIMIT = 200_000
IDLE_TIMEOUT_S = 60


def primes_below(limit):
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\0\0"
    for i in range(2, int(limit**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, limit, i)))
    return [i for i in range(limit) if sieve[i]]


PRIMES = primes_below(LIMIT)


def body(path):
    """The answer to GET `path` (bytes): depends on the warm table and the path."""
    digest = hashlib.sha256(("%s|%d" % (path, PRIMES[-1])).encode()).hexdigest()
    index = int(digest[:8], 16) % len(PRIMES)
    out = {
        "path": path,
        "prime": PRIMES[index],
        "primes_below": len(PRIMES),
        "digest": digest[:16],
        "pid": os.getpid(),
    }
    return (json.dumps(out) + "\n").encode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        data = body(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args):
        pass


class InheritedServer(http.server.HTTPServer):
    """An HTTPServer on an already bound and listening socket."""

    def __init__(self, sock):
        http.server.socketserver.BaseServer.__init__(self, sock.getsockname()[:2], Handler)
        self.socket = sock
        self.server_name, self.server_port = self.server_address
        self.timeout = IDLE_TIMEOUT_S
        self.timed_out = False

    def handle_timeout(self):
        self.timed_out = True


def write_all(fd, data):
    while data:
        data = data[os.write(fd, data) :]


def read_line():
    """One line from stdin, read with read(0) and never past its newline."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(0, 1)
        if not chunk:
            break
        line += chunk
    return line.decode().strip()


def serve(count):
    try:
        sock = socket.socket(fileno=3)
    except OSError as err:
        try:
            what = os.readlink("/proc/self/fd/3")
        except OSError:
            what = "nothing"
        sys.stderr.write("http_fn.py: no listening socket as fd 3 (%s; fd 3 is %s)\n" % (err, what))
        return 1
    server = InheritedServer(sock)
    for _ in range(count):
        server.handle_request()
        if server.timed_out:
            sys.stderr.write("http_fn.py: no request for %d s\n" % IDLE_TIMEOUT_S)
            return 1
    return 0


def main(argv):
    if len(argv) == 2 and argv[0] == "--answer":
        write_all(1, body(argv[1]))
        return 0
    if argv:
        sys.stderr.write("usage: http_fn.py [--answer PATH]\n")
        return 2
    body("/")  # the request path once, so nothing is left to warm up
    write_all(1, b"ready\n")
    words = read_line().split()
    if len(words) != 2 or words[0] != "serve" or not words[1].isdigit():
        sys.stderr.write("http_fn.py: expected `serve N`, got %r\n" % " ".join(words))
        return 2
    return serve(int(words[1]))


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)
