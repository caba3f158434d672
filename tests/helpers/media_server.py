"""A local HTTP server for the downloader tests, and the media it serves.

`MediaServer` is a threaded `http.server` on 127.0.0.1 (an ephemeral port, nothing else is ever
contacted). Each path serves fixed bytes and can misbehave the ways the web does: a status code
(404, 500), a delay longer than the client's timeout, a number of 503s before it works (to show
retries), and a global delay per request (to keep a run busy long enough to kill it). It counts
requests per path, so tests can assert that a retry happened or that a resumed run re-fetched
only what it had to.

The media makers write real files with the same libraries the sources decode them with: PNG and
JPEG through PIL, OGG Vorbis and FLAC through libsndfile.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import soundfile as sf
from PIL import Image


@dataclass
class Route:
    body: bytes
    status: int = 200
    content_type: str = "application/octet-stream"
    delay_s: float = 0.0  # before the headers: longer than the client's timeout means a timeout
    fail_first: int = 0  # answer 503 to this many requests, then `status`


class MediaServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.delay_s = 0.0  # added to every request
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.hits[path] += 1
                    hit = server.hits[path]
                route = server.routes.get(path)
                time.sleep(server.delay_s + (route.delay_s if route else 0.0))
                if route is None:
                    self.send_error(404)
                    return
                if hit <= route.fail_first:
                    self.send_error(503)
                    return
                if route.status != 200:
                    self.send_error(route.status)
                    return
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", route.content_type)
                    self.send_header("Content-Length", str(len(route.body)))
                    self.end_headers()
                    self.wfile.write(route.body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        # A short poll interval: shutdown() waits for one, and every test stops a server.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, body: bytes, **kwargs) -> str:
        self.routes[path] = Route(body, **kwargs)
        return self.url(path)

    def start(self) -> "MediaServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# --- media -------------------------------------------------------------------------------------


def image_bytes(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    """A small RGB image whose pixels depend on `seed` (so samples differ), as PNG or JPEG."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def audio_bytes(seed: int, seconds: float = 0.5, rate: int = 22050, fmt: str = "OGG") -> bytes:
    """A short tone (pitch from `seed`) as OGG Vorbis or FLAC, at a rate the sources must resample."""
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt, **({"subtype": "VORBIS"} if fmt == "OGG" else {}))
    return buf.getvalue()


def truncated(data: bytes) -> bytes:
    """The first half of a file: headers parse, pixel data ends early."""
    return data[: len(data) // 2]


GARBAGE = b"this is not an image, just text served with an image URL\n" * 4
