"""A local HTTP server for download tests, and small GloVe archives in the Stanford layout.

``GloveServer`` serves in-memory files on 127.0.0.1 from a thread.  Its ``mode`` decides how it
treats a ``Range`` request: ``"range"`` answers 206 with the slice, ``"norange"`` ignores the
header and answers 200 with everything.  ``cut_after`` makes the next ``cuts`` responses announce
their full length but close the connection after that many body bytes.  ``statuses`` is a list of
HTTP error codes answered, one each, to the next requests (``[503, 503]``: two failures, then the
file).  ``delay_s`` throttles a body: it is sent in pieces of ``piece`` bytes with that pause after
each, so that two clients overlap; ``hold`` (an Event) keeps every body back until it is set.
``requests`` records the ``(path, Range header)`` of every
request, so a test can tell what was (not) downloaded.
"""

from __future__ import annotations

import io
import re
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


class GloveServer:
    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.mode = "range"
        self.cut_after: int | None = None
        self.cuts = 0
        self.statuses: list[int] = []
        self.delay_s = 0.0
        self.piece = 16_384
        self.hold: threading.Event | None = None
        self.requests: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self) -> GloveServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.lstrip("/")
        range_header = handler.headers.get("Range")
        with self._lock:
            self.requests.append((path, range_header))
            cut = self.cut_after if self.cuts > 0 else None
            if cut is not None:
                self.cuts -= 1
            status = self.statuses.pop(0) if self.statuses else None
        if status is not None:
            handler.send_error(status)
            return
        body = self.files.get(path)
        if body is None:
            handler.send_error(404, "Not Found")
            return
        start, status = 0, 200
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if self.mode == "range" and match:
            start = int(match.group(1))
            if start >= len(body):
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(body)}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            status = 206
        part = body[start:]
        handler.send_response(status)
        handler.send_header("Content-Type", "application/zip")
        handler.send_header("Content-Length", str(len(part)))
        if status == 206:
            handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        handler.end_headers()
        if self.hold is not None:
            self.hold.wait(60)
        part = part if cut is None else part[:cut]
        step = self.piece if self.delay_s else max(len(part), 1)
        for i in range(0, len(part), step):
            handler.wfile.write(part[i : i + step])
            handler.wfile.flush()
            time.sleep(self.delay_s)
        handler.close_connection = True


def glove_text(vectors: np.ndarray, words: list[str]) -> bytes:
    """The Stanford text format: ``word x1 ... xd`` per line, five decimals, a final newline."""
    fmt = " ".join(["%.5f"] * vectors.shape[1])
    return "".join(f"{w} {fmt % tuple(row)}\n" for w, row in zip(words, vectors)).encode("utf-8")


def make_vectors(rows: int, dim: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(rows)]
    words[1:4] = [
        "#",
        "naïve",
        "日本",
    ]  # a comment character and non-ASCII words, as in the real files
    return rng.standard_normal((rows, dim)).astype(np.float32), words


def expected_vectors(text: bytes) -> np.ndarray:
    """The oracle: each number parsed on its own with float()."""
    return np.array(
        [[float(x) for x in line.split(b" ")[1:]] for line in text.splitlines()], np.float32
    )


def make_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip archive of ``members``; ``ZIP_STORED`` keeps each text as it is, so that one altered
    byte changes the text and nothing else."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


# The archive both GloVe test files serve: two dimensions of one small vocabulary.
ROWS = 300
TEXT50 = glove_text(*make_vectors(ROWS, 50, seed=0))
TEXT100 = glove_text(*make_vectors(ROWS, 100, seed=1))
ARCHIVE = make_zip({"glove.6B.50d.txt": TEXT50, "glove.6B.100d.txt": TEXT100})
