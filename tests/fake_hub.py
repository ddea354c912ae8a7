"""A stand-in for the Hugging Face Hub on 127.0.0.1, for testing downloads offline.

It answers what huggingface_hub asks for a file, ``HEAD`` and ``GET /<repo>/resolve/<revision>/<file>``:
``X-Repo-Commit``, ``ETag`` (the sha256 of the content, as the Hub gives for LFS files, or a value
set by the test), ``Content-Length`` and ``Range`` requests (206). ``drop_after`` makes the first GET
of a file send only that many bytes of its body and close the connection (a dropped download);
``requests`` records what was asked. Point huggingface_hub at it with ``huggingface_hub.constants.ENDPOINT``
(what ``HF_ENDPOINT`` sets).
"""

from __future__ import annotations

import hashlib
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    content: bytes
    etag: str | None = None  # default: the content's sha256
    drop_after: int | None = None  # the first GET sends this many body bytes, then closes

    def advertised_etag(self) -> str:
        return self.etag or hashlib.sha256(self.content).hexdigest()


@dataclass
class FakeHub:
    files: dict[tuple[str, str], HubFile] = field(default_factory=dict)  # (repo id, file name) -> file
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)

    def __post_init__(self):
        hub = self
        self._dropped: set[tuple[str, str]] = set()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(handler.path).path)
        self.requests.append((handler.command, path, handler.headers.get("Range")))
        repo, sep, rest = path.lstrip("/").partition("/resolve/")
        filename = rest.partition("/")[2] if sep else ""
        served = self.files.get((repo, filename))
        if served is None:
            handler.send_response(404)
            handler.send_header("X-Error-Code", "EntryNotFound")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        content, start = served.content, 0
        wanted = handler.headers.get("Range")
        if wanted and wanted.startswith("bytes="):
            start = int(wanted[len("bytes="):].split("-")[0] or 0)
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{served.advertised_etag()}"')
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Length", str(len(content) - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        handler.end_headers()
        if not body:
            return
        key = (repo, filename)
        if served.drop_after is not None and key not in self._dropped:
            self._dropped.add(key)
            handler.wfile.write(content[start:start + served.drop_after])
            handler.wfile.flush()
            handler.close_connection = True
            return
        handler.wfile.write(content[start:])
