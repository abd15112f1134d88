"""A local image server on 127.0.0.1 for the LAION/img2dataset tests and the shard-writing
benchmark: real HTTP, no network beyond the loopback.

Routes are registered up front as path -> Route (status, body, headers, delay); anything not
registered answers 404. The server is threaded (img2dataset downloads with many threads) and
binds a free port chosen by the kernel, so tests can run side by side.
"""
from __future__ import annotations

import dataclasses
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


@dataclasses.dataclass
class Route:
    body: bytes
    status: int = 200
    content_type: str = "image/jpeg"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    delay_s: float = 0.0  # sleep before answering: a slow server


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, Route] = {}  # replaced per server by a subclass attribute
    hits: dict[str, int] = {}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        route = self.routes.get(self.path)
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if route is None:
            route = Route(body=b"not found", status=404, content_type="text/plain")
        if route.delay_s:
            time.sleep(route.delay_s)
        try:
            self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", str(len(route.body)))
            for name, value in route.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(route.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout ran out): expected for the slow routes

    def log_message(self, *args):  # keep test output quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # do not wait for sleeping slow-route threads on close
    request_queue_size = 128


class ImageServer:
    """`with ImageServer(routes) as server: server.url("/a.jpg")`."""

    def __init__(self, routes: dict[str, Route]):
        handler = type("Handler", (_Handler,), {"routes": dict(routes), "hits": {}})
        self._handler = handler
        self._server = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def hits(self) -> dict[str, int]:
        """Requests received per path (retries show up here)."""
        return self._handler.hits

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> "ImageServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "ImageServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def make_image_bytes(width: int, height: int, seed: int, fmt: str = "JPEG",
                     mode: str = "RGB") -> bytes:
    """A photo-like test image (smooth gradients plus a few blocks plus mild noise), so that JPEG
    encode/decode costs are realistic; deterministic by seed."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    slope = rng.uniform(-0.4, 0.4, size=(2, 3)).astype(np.float32)
    img = base + xs[..., None] * slope[0] + ys[..., None] * slope[1]
    for _ in range(4):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        img[y0:y0 + height // 4, x0:x0 + width // 4] = rng.uniform(0, 255, size=3)
    img += rng.normal(0, 6, size=img.shape).astype(np.float32)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    if mode != "RGB":
        pil = pil.convert(mode)
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def image_route(width: int, height: int, seed: int, **kwargs) -> Route:
    return Route(body=make_image_bytes(width, height, seed), **kwargs)


def corrupt_route() -> Route:
    """Served as image/jpeg with status 200, but the bytes are a truncated JPEG header plus junk:
    the download succeeds and the decode fails."""
    return Route(body=b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20)
