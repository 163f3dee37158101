"""A tiny, real HTTP server that speaks enough of the Hugging Face hub protocol for tests.

Machines here never reach the real hub, yet the download code must be tested
for real: this server answers ``HEAD`` / ``GET /{repo}/resolve/{revision}/{path}``
the way ``huggingface_hub`` expects (``X-Repo-Commit``, ``ETag``,
``X-Linked-Etag`` / ``X-Linked-Size`` for LFS files, ``Range`` requests) and
never advertises Xet storage, so the library takes its plain HTTP path.

It can also misbehave on purpose: cut a download after N bytes, fail the
next requests, or serve bytes that do not match the advertised sha256.

Usage::

    with FakeHub() as hub:  # from tests.hubserver import FakeHub
        hub.add_file("acme/model", "model.bin", data)
        registry = ModelRegistry(catalog, [], cache, hub_endpoint=hub.endpoint)
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_PATH_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
_RANGE_RE = re.compile(r"^bytes=(?P<start>\d+)-(?P<end>\d*)$")


@dataclass
class HubFile:
    """One file of a fake repository."""

    data: bytes
    """The true content: its sha256 / size are what the server advertises."""
    lfs: bool = True
    """LFS files advertise ``X-Linked-Etag: <sha256>``; others a git blob sha1 ETag."""
    served: bytes | None = None
    """Bytes actually sent by GET (to simulate corruption); None: ``data``."""
    cut_after: int | None = None
    """The next GET sends this many body bytes, then closes the connection."""
    fail_next: int = 0
    """After a cut, this many following GETs answer 503."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:
        if self.lfs:
            return self.sha256
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()


@dataclass
class RecordedRequest:
    """A request the server received (for assertions)."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)


class FakeHub:
    """Serve in-memory repositories on ``127.0.0.1:<free port>`` from a background thread."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str, str], HubFile] = {}
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content -------------------------------------------------------------------

    def add_file(
        self,
        repo: str,
        path: str,
        data: bytes,
        *,
        revision: str = "main",
        lfs: bool = True,
        served: bytes | None = None,
    ) -> HubFile:
        """Publish ``data`` as ``repo``/``path`` at ``revision``."""
        hub_file = HubFile(data=data, lfs=lfs, served=served)
        self.files[(repo, revision, path)] = hub_file
        return hub_file

    def interrupt(
        self, repo: str, path: str, *, after: int, fail_next: int = 0, revision: str = "main"
    ) -> None:
        """Cut the next GET of the file after ``after`` bytes; then fail ``fail_next`` GETs."""
        hub_file = self.files[(repo, revision, path)]
        hub_file.cut_after = after
        hub_file.fail_next = fail_next

    def gets(self, suffix: str = "") -> list[RecordedRequest]:
        """GET requests received, optionally only those whose path ends with ``suffix``."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path.endswith(suffix)]

    # -- lifecycle -----------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_HubHandler):
            owner = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _HubHandler(BaseHTTPRequestHandler):
    owner: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: tests assert on ``FakeHub.requests`` instead."""

    def _record(self) -> None:
        with self.owner._lock:
            self.owner.requests.append(
                RecordedRequest(self.command, self.path, {k: v for k, v in self.headers.items()})
            )

    def _lookup(self) -> HubFile | None:
        match = _PATH_RE.match(self.path.split("?")[0])
        if match is None:
            self._error(404, "RepoNotFound", "not a /{repo}/resolve/{revision}/{path} URL")
            return None
        key = (match["repo"], match["revision"], match["path"])
        hub_file = self.owner.files.get(key)
        if hub_file is None:
            known_repo = any(k[0] == key[0] for k in self.owner.files)
            code = "EntryNotFound" if known_repo else "RepoNotFound"
            self._error(404, code, f"{key[2]} does not exist in {key[0]}@{key[1]}")
        return hub_file

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def _common_headers(self, hub_file: HubFile) -> None:
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hub_file.etag}"')
        if hub_file.lfs:
            self.send_header("X-Linked-Etag", f'"{hub_file.sha256}"')
            self.send_header("X-Linked-Size", str(len(hub_file.data)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Connection", "close")
        self.close_connection = True

    def do_HEAD(self) -> None:
        self._record()
        hub_file = self._lookup()
        if hub_file is None:
            return
        self.send_response(200)
        self._common_headers(hub_file)
        self.send_header("Content-Length", str(len(hub_file.data)))
        self.end_headers()

    def do_GET(self) -> None:
        self._record()
        hub_file = self._lookup()
        if hub_file is None:
            return
        with self.owner._lock:
            cut, hub_file.cut_after = hub_file.cut_after, None
            failing = cut is None and hub_file.fail_next > 0
            if failing:
                hub_file.fail_next -= 1
        if failing:
            self._error(503, "ServiceUnavailable", "temporarily unavailable (test)")
            return
        body = hub_file.served if hub_file.served is not None else hub_file.data
        total = len(body)
        start, end = 0, total - 1
        range_header = self.headers.get("Range")
        match = _RANGE_RE.match(range_header or "")
        if match:
            start = int(match["start"])
            end = int(match["end"]) if match["end"] else total - 1
            if start >= total:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        else:
            self.send_response(200)
        self._common_headers(hub_file)
        chunk = body[start : end + 1]
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        if cut is not None:
            self.wfile.write(chunk[:cut])
            self.wfile.flush()
            return  # Connection: close with fewer bytes than announced: an interrupted download
        self.wfile.write(chunk)
