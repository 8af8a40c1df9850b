"""A tiny stand-in for the Hugging Face hub on 127.0.0.1, for download tests that must not touch the internet.

It answers the requests ``huggingface_hub`` makes for ``hf_hub_download`` and ``snapshot_download`` (checked against
huggingface_hub 0.25.2 and 2.4.0, ``file_download.py``, ``_snapshot_download.py`` and ``hf_api.py``):

- ``HEAD``/``GET /{repo}/resolve/{revision}/{path}``: the file, with ``ETag``, ``X-Repo-Commit``, ``Content-Length``
  and ``Accept-Ranges``; a ``Range: bytes=N-`` GET gets ``206 Partial Content`` with ``Content-Range``.
- ``GET /api/models/{repo}/revision/{revision}``: repo info with ``sha`` and ``siblings`` (all that 0.2x needs).
- ``GET /api/models/{repo}/tree/{revision}[/{path}]?recursive=…``: the file listing 1.x/2.x fetch after the info.
- Anything else: 404 with the hub's ``X-Error-Code`` header, so the client raises its own not-found errors.

Knobs for failure tests: ``fail_status`` answers every request with that status (a hub outage), ``cut_after`` makes the
next full GET of a file stop after some bytes and drop the connection (a network cut).  Every request is recorded in
``requests``, completely (status, body bytes) before any byte of its response is sent.  The server speaks HTTP/1.0
(one request per connection, so no idle keep-alive threads outlive a test), has a socket timeout, stops answering
normally after ``max_requests`` and is shut down by ``close()`` / the ``with`` block.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

Files = dict[str, bytes]


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    body_bytes: int = 0


@dataclass
class FakeRepo:
    repo_id: str
    files: Files
    commit: str = ""

    def __post_init__(self) -> None:
        if not self.commit:
            digest = hashlib.sha1(self.repo_id.encode())
            for path in sorted(self.files):
                digest.update(path.encode() + b"\0" + self.files[path])
            self.commit = digest.hexdigest()

    def etag(self, path: str) -> str:
        return hashlib.sha256(self.files[path]).hexdigest()


@dataclass
class FakeHub:
    """``with FakeHub({"owner/name": {"path/in/repo": b"bytes"}}) as hub:`` then download from ``hub.url``."""

    repos: dict[str, Files]
    max_requests: int = 200
    fail_status: int | None = None
    cut_after: dict[str, int] = field(default_factory=dict)  # "owner/name/path" -> bytes sent before the cut
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._repos = {repo_id: FakeRepo(repo_id, dict(files)) for repo_id, files in self.repos.items()}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.overflowed = False

    # ---- lifecycle
    def __enter__(self) -> FakeHub:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start the FakeHub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ---- inspection
    def repo(self, repo_id: str) -> FakeRepo:
        return self._repos[repo_id]

    def seen(self, method: str | None = None, contains: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method) and contains in r.path]

    def _record(self, request: Request) -> bool:
        """Store a request; False once ``max_requests`` is reached (the handler then answers 503)."""
        with self._lock:
            self.requests.append(request)
            if len(self.requests) > self.max_requests:
                self.overflowed = True
                return False
            return True


def closed_port_url() -> str:
    """URL of a loopback port nothing listens on (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    timeout = 5  # seconds a connection may stay silent

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(head=False)

    # ---- routing
    def _answer(self, head: bool) -> None:
        request = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        if not self.hub._record(request):
            return self._send(request, 503, b"too many requests", head)
        if self.hub.fail_status is not None:
            return self._send(request, self.hub.fail_status, b"the fake hub is down", head)
        url = urlsplit(self.path)
        parts = [unquote(part) for part in url.path.split("/") if part]
        if len(parts) >= 5 and parts[:2] == ["api", "models"] and parts[4] == "revision":
            return self._info(request, "/".join(parts[2:4]), "/".join(parts[5:]), head)
        if len(parts) >= 5 and parts[:2] == ["api", "models"] and parts[4] == "tree":
            query = parse_qs(url.query)
            recursive = query.get("recursive", ["false"])[0].lower() in {"1", "true"}
            return self._tree(request, "/".join(parts[2:4]), parts[5], "/".join(parts[6:]), recursive, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file(request, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
        return self._send(request, 404, b"not found", head, {"X-Error-Code": "RepoNotFound"})

    def _repo(self, request: Request, repo_id: str, revision: str, head: bool) -> FakeRepo | None:
        repo = self.hub._repos.get(repo_id)
        if repo is None:
            self._send(request, 404, b"repository not found", head, {"X-Error-Code": "RepoNotFound"})
            return None
        if revision not in ("main", repo.commit):
            self._send(request, 404, b"revision not found", head, {"X-Error-Code": "RevisionNotFound"})
            return None
        return repo

    def _info(self, request: Request, repo_id: str, revision: str, head: bool) -> None:
        repo = self._repo(request, repo_id, revision, head)
        if repo is None:
            return
        info = {
            "_id": repo.commit[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": repo.commit,
            "private": False,
            "disabled": False,
            "gated": False,
            "tags": [],
            "lastModified": "2024-04-19T00:00:00.000Z",
            "siblings": [{"rfilename": path} for path in sorted(repo.files)],
        }
        self._send_json(request, info, head)

    def _tree(self, request: Request, repo_id: str, revision: str, folder: str, recursive: bool, head: bool) -> None:
        repo = self._repo(request, repo_id, revision, head)
        if repo is None:
            return
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict] = {}
        for path in sorted(repo.files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :].split("/")
            for depth in range(1, len(rest)):  # the folders on the way
                folder_path = prefix + "/".join(rest[:depth])
                if recursive or depth == 1:
                    folder_entry = {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder_path}
                    entries.setdefault(folder_path, folder_entry)
            if recursive or len(rest) == 1:
                oid = hashlib.sha1(b"blob %d\0" % len(repo.files[path]) + repo.files[path]).hexdigest()
                entries[path] = {"type": "file", "oid": oid, "size": len(repo.files[path]), "path": path}
        self._send_json(request, list(entries.values()), head)

    def _file(self, request: Request, repo_id: str, revision: str, path: str, head: bool) -> None:
        repo = self._repo(request, repo_id, revision, head)
        if repo is None:
            return
        if path not in repo.files:
            extra = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit}
            return self._send(request, 404, b"entry not found", head, extra)
        data = repo.files[path]
        headers = {
            "ETag": f'"{repo.etag(path)}"',
            "X-Repo-Commit": repo.commit,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        status, start = 200, 0
        wanted = request.headers.get("range", "")
        if not head and wanted.startswith("bytes="):
            first, _, last = wanted[len("bytes=") :].partition("-")
            start, end = int(first), int(last) if last else len(data) - 1
            if start >= len(data):
                return self._send(request, 416, b"", head, {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            status, data = 206, data[start : end + 1]
        cut = None if head else self.hub.cut_after.pop(f"{repo_id}/{path}", None)
        self._send(request, status, data, head, headers, cut=cut)

    # ---- writing
    def _send_json(self, request: Request, payload: object, head: bool) -> None:
        self._send(request, 200, json.dumps(payload).encode(), head, {"Content-Type": "application/json"})

    def _send(
        self,
        request: Request,
        status: int,
        body: bytes,
        head: bool,
        headers: dict[str, str] | None = None,
        cut: int | None = None,
    ) -> None:
        sent = b"" if head else body if cut is None else body[:cut]
        # The record is complete before the client can see any of the response: a client that has read the whole
        # body may look at it at once (on a busy machine this thread may not run again before it does).
        request.status, request.body_bytes = status, len(sent)
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        self.wfile.write(sent)
        self.wfile.flush()
        if cut is not None:  # drop the connection mid-body, as a network cut would
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
