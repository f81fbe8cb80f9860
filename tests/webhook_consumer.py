"""A real webhook consumer on loopback for the tests: an HTTP server in a thread that records
every request it gets and answers as the test tells it (status, headers, delay)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import standardwebhooks


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    status: int  # what the consumer answered

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    def event(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Answer:
    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Consumer:
    """`answer` decides each response; it can be replaced while the consumer runs."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.answer: Callable[[Received], Answer] = lambda _r: Answer()
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Consumer:
        consumer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                probe = Received(self.path, headers, body, 0)
                answer = consumer.answer(probe)
                with consumer._lock:
                    consumer.received.append(Received(self.path, headers, body, answer.status))
                if answer.delay:
                    time.sleep(answer.delay)
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)
                except OSError:
                    pass  # the dispatcher went away (killed) mid-request

            def log_message(self, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Consumer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def accepted(self) -> Counter[str]:
        """webhook-id -> how many times the consumer answered it with a 2xx."""
        return Counter(r.id for r in self.requests() if 200 <= r.status < 300)

    def verified(self, secret: str) -> list[Any]:
        """Every request checked with the independent Standard Webhooks implementation."""
        reference = standardwebhooks.Webhook(secret)
        return [reference.verify(r.body, r.headers) for r in self.requests()]
