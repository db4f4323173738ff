"""A fault-injecting HTTP proxy in front of the GCS emulator, on 127.0.0.1.

Requests are forwarded to the emulator unchanged; a fault schedule turns every Nth request
whose method and path match a rule into an error status (503, 429, 403...), a reply dropped
after the request was forwarded (the store did the work, the client never hears so), or a
slow reply. Point a
client's STORAGE_EMULATOR_HOST at `proxy.url` to put it behind the proxy; the schedule can be
changed while it runs (`proxy.faults = [...]`) and `proxy.injected` counts what was done.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


@dataclass
class Fault:
    """Every `every`-th request of `method` whose path matches `path` gets `action`, at most
    `times` times (0: no limit): an HTTP status ("503", "429", "403"), "drop" (forwarded,
    then the connection closed with no reply) or "delay" (forwarded, answered after
    `delay_s`)."""

    method: str
    path: str
    action: str
    every: int = 1
    delay_s: float = 1.0
    times: int = 0
    seen: int = field(default=0, compare=False)
    done: int = field(default=0, compare=False)

    def hit(self, method: str, path: str) -> bool:
        if method != self.method or not re.search(self.path, path):
            return False
        if self.times and self.done >= self.times:
            return False
        self.seen += 1
        if self.seen % self.every:
            return False
        self.done += 1
        return True


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.faults: list[Fault] = []
        self.injected: dict[str, int] = {}
        self.log: list[tuple[str, str, str]] = []  # (method, path, action or "ok")
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client expects

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = b""
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return out
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, headers, body: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):  # the client went first
                    pass

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._fault(self.command, self.path)
                action = fault.action if fault else "ok"
                if action.isdigit():  # answered here, never forwarded
                    msg = b'{"error": {"code": %s, "message": "injected"}}' % action.encode()
                    self._answer(int(action), [("Content-Type", "application/json")], msg)
                    return
                status, headers, reply = proxy._forward(self.command, self.path, self.headers, body)
                if action == "drop":  # the store did it; the client hears nothing
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if action == "delay":
                    time.sleep(fault.delay_s)
                self._answer(status, headers, reply)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            fault = next((f for f in self.faults if f.hit(method, path)), None)
            action = fault.action if fault else "ok"
            if fault:
                self.injected[action] = self.injected.get(action, 0) + 1
            self.log.append((method, path, action))
            return fault

    def _forward(self, method, path, headers, body):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in HOP}
            sent["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=sent)
            reply = conn.getresponse()
            return reply.status, reply.getheaders(), reply.read()
        finally:
            conn.close()

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
