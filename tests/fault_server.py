"""An HTTP server on 127.0.0.1 (http.server in a thread) that serves a folder and injects seeded faults: 503s,
connections reset or cut mid-body, and stalls longer than a short --data-timeout; Range requests are honoured (or,
``ranges=False``, ignored as python -m http.server does). It counts the body bytes it sent."""
from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: str, seed: int = 0, error_p: float = 0.0, reset_p: float = 0.0, stall_p: float = 0.0,
                 stall_s: float = 1.0, ranges: bool = True, only: str = ".tar"):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.rng, self.lock = root, random.Random(seed), threading.Lock()
        self.error_p, self.reset_p, self.stall_p, self.stall_s, self.ranges = error_p, reset_p, stall_p, stall_s, ranges
        self.only = only                          # faults only for paths ending so (the index files are read plainly)
        self.gone: set[str] = set()               # paths whose GET is answered 404 (HEAD still finds them)
        self.script: list[tuple[str | None, float]] = []  # (fault, where) for the next GETs of faulted paths, first
        self.range_starts: list[int] = []         # the byte each Range request asked to start at
        self.head_errors = 0                      # the next HEADs answered 503
        self.sent = 0                             # body bytes sent
        self.faults = 0
        self.gets: list[str] = []
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def draw(self, path: str) -> tuple[str | None, float]:
        """The fault of one GET (None, 'error', 'reset', 'stall') and where in the body it strikes (a fraction)."""
        with self.lock:
            x, where = self.rng.random(), self.rng.random()
            if not path.endswith(self.only):
                return None, 0.0
            if self.script:
                fault, where = self.script.pop(0)
            else:
                fault = next((f for f, p in self._bands() if x < p), None)
            self.faults += fault is not None
            return fault, where

    def _bands(self):
        edge = 0.0
        for fault, p in (("error", self.error_p), ("reset", self.reset_p), ("stall", self.stall_p)):
            edge += p
            yield fault, edge

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FaultServer

    def log_message(self, *args) -> None:
        pass

    def _file(self, get: bool = False) -> str | None:
        path = os.path.join(self.server.root, self.path.split("?")[0].lstrip("/"))
        if (get and self.path in self.server.gone) or not os.path.isfile(path):
            self.send_error(404)
            return None
        return path

    def do_HEAD(self) -> None:
        path = self._file()
        with self.server.lock:
            busy, self.server.head_errors = self.server.head_errors > 0, max(0, self.server.head_errors - 1)
        if path and busy:
            self.send_error(503)
        elif path:
            self.send_response(200)
            self.send_header("Content-Length", str(os.path.getsize(path)))
            self.end_headers()

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.gets.append(self.path)
        path = self._file(get=True)
        if not path:
            return
        fault, where = self.server.draw(self.path)
        if fault == "error":
            self.send_error(503)
            return
        with open(path, "rb") as f:
            data = f.read()
        start = self._range_start()
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = int(len(body) * where) if fault else len(body)
        self._send(body[:cut])
        if fault == "stall":
            time.sleep(self.server.stall_s)
        if fault:  # reset: RST at once; stall: the client gave up meanwhile
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True

    def _range_start(self) -> int:
        r = self.headers.get("Range")
        if not (r and r.startswith("bytes=") and r.endswith("-")):
            return 0
        self.server.range_starts.append(int(r[len("bytes="):-1]))
        return self.server.range_starts[-1] if self.server.ranges else 0

    def _send(self, body: bytes) -> None:
        try:
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            return
        with self.server.lock:
            self.server.sent += len(body)
