"""A local stand-in for the Hugging Face Hub on 127.0.0.1, for tests that must not reach the network.

It serves the endpoints `huggingface_hub.hf_hub_download` uses — HEAD and GET
`/{repo_id}/resolve/{revision}/{filename}` with the `X-Repo-Commit`, `ETag` and `Content-Length` headers,
byte ranges for resumed downloads, and the `X-Error-Code` header the client maps to its not-found errors —
so downloads go through huggingface_hub's real code path with HF_ENDPOINT pointing here.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStandIn:
    def __init__(self, files: dict[tuple[str, str], bytes], commit: str = COMMIT):
        self.files = dict(files)
        self.commit = commit
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "HubStandIn":
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                stand_in.requests.append((self.command, self.path))
                parts = unquote(urlparse(self.path).path).lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "EntryNotFound", "unknown endpoint")
                repo, filename = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
                if not any(r == repo for r, _ in stand_in.files):
                    return self._error(404, "RepoNotFound", f"repository {repo} not found")
                data = stand_in.files.get((repo, filename))
                if data is None:
                    return self._error(404, "EntryNotFound", f"{filename} not found in {repo}")
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and body:
                    start = int(rng[len("bytes="):].split("-")[0] or 0)
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", stand_in.commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if body:
                    self.wfile.write(data[start:])

            def _error(self, code: int, error_code: str, message: str):
                payload = ('{"error": "%s"}' % message).encode()
                self.send_response(code)
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", message)
                self.send_header("X-Repo-Commit", stand_in.commit)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def refused_endpoint() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
