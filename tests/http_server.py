"""A download site on 127.0.0.1 for tests: serves in-memory files, and can cut, corrupt, refuse or slow them.

    with FileServer({"cifar/cifar-100-python.tar.gz": archive}) as server:
        url = server.url("cifar/cifar-100-python.tar.gz")
        server.truncate["cifar/cifar-100-python.tar.gz"] = 100   # send 100 bytes, then hang up
        server.status["missing.bin"] = 404                        # answer with an HTTP error
        server.requests                                           # every path asked for, in order

The socket guard in conftest.py lets tests reach only this loopback server.
"""
from __future__ import annotations

import gzip
import http.server
import io
import socket
import tarfile
import threading
import time
from typing import Any


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        site = self.server.site
        path = self.path.lstrip("/").split("?", 1)[0]
        with site.lock:
            site.requests.append(path)
        status = site.status.get(path)
        if status is not None or path not in site.files:
            self.send_error(status or 404)
            return
        body = site.files[path]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        sent = body[: site.truncate[path]] if path in site.truncate else body
        chunk = site.chunk_size
        for start in range(0, len(sent), chunk):
            self.wfile.write(sent[start:start + chunk])
            self.wfile.flush()
            if site.delay:
                time.sleep(site.delay)
        if path in site.truncate:
            self.close_connection = True  # the client sees fewer bytes than Content-Length promised

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    site: "FileServer"


class FileServer:
    """An HTTP server on 127.0.0.1 (a free port) serving `files` (path -> bytes) from a background thread."""

    def __init__(self, files: dict[str, bytes] | None = None, chunk_size: int = 64 * 1024, delay: float = 0.0):
        self.files = dict(files or {})
        self.truncate: dict[str, int] = {}
        self.status: dict[str, int] = {}
        self.requests: list[str] = []
        self.chunk_size, self.delay = chunk_size, delay
        self.lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.site = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        """The site's base URL, ending in '/'."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def url(self, path: str) -> str:
        """The URL of `path` on this server."""
        return self.base + path.lstrip("/")

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def refused_url(path: str = "file.bin") -> str:
    """A loopback URL where nothing listens: connecting is refused at once (a firewall or a dead mirror)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{path}"


def tar_gz(members: dict[str, bytes]) -> bytes:
    """A .tar.gz archive holding `members` (member path -> bytes), as a publisher would serve it.

    The same members give the same bytes: the gzip header's time is fixed at 0, because tarfile's "w:gz" stamps the
    current second there, and a test that rebuilds an archive across a second boundary would get another md5.
    """
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as zipped, tarfile.open(fileobj=zipped, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
