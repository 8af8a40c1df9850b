"""The fake hub itself: what download tests read from it must be complete when the client has its response."""

from __future__ import annotations

import sys
import threading
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakehub  # noqa: E402


class _HeldWriter:
    """The handler's socket writer, except that ``flush`` (called once the body is written) waits until the test
    lets it go: the server thread is then as late as a busy machine can make it, after the client has everything."""

    def __init__(self, writer, release: threading.Event):
        self._writer, self._release = writer, release

    def write(self, data):
        return self._writer.write(data)

    def flush(self):
        self._release.wait(30)
        return self._writer.flush()

    def __getattr__(self, name):  # the rest (``closed``, ``close`` in the handler's ``finish``) is the writer's
        return getattr(self._writer, name)


def test_a_request_is_recorded_before_its_response_is_sent(monkeypatch):
    release = threading.Event()
    setup = fakehub._Handler.setup

    def held_setup(handler):
        setup(handler)
        handler.wfile = _HeldWriter(handler.wfile, release)

    monkeypatch.setattr(fakehub._Handler, "setup", held_setup)
    data = bytes(range(256)) * 4
    with fakehub.FakeHub({"owner/repo": {"file.bin": data}}) as hub:
        try:
            with urllib.request.urlopen(f"{hub.url}/owner/repo/resolve/main/file.bin", timeout=30) as response:
                assert response.read() == data
            (request,) = hub.seen("GET", "file.bin")
            assert request.status == 200 and request.body_bytes == len(data)
        finally:
            release.set()
