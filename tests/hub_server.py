"""A local, read-only server speaking the Hub's HTTP API, enough for huggingface_hub's downloads and lookups.

It serves in-memory model repos on 127.0.0.1 (an ephemeral port): repo info and revisions, file trees, file
resolution (HEAD and GET, with `Range` for resumed downloads) and collection listings. Point `HF_ENDPOINT` at
`server.url` and huggingface_hub talks to it as it would to the Hub.
"""

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".pt", ".safetensors", ".bin")


class LocalHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self.fail_after_bytes: dict[str, int] = {}  # path -> cut the body after N bytes (simulates a dropped link)
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def commit(self, repo_id: str) -> str:
        files = self.repos[repo_id]
        digest = hashlib.sha1()
        for path in sorted(files):
            digest.update(path.encode() + hashlib.sha1(files[path]).digest())
        return digest.hexdigest()


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _json(self, payload, status: int = 200, headers: dict | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _not_found(self, code: str, message: str) -> None:
        self._json({"error": message}, 404, {"X-Error-Code": code, "X-Error-Message": message})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = unquote(urlparse(self.path).path)
        self.hub.requests.append((self.command, path, self.headers.get("Range", "")))
        if path == "/api/collections":
            return self._json([])
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            return self._repo_info(match.group(1))
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            return self._tree(match.group(1))
        if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(match.group(1), match.group(3))
        return self._not_found("EntryNotFound", f"no route for {path}")

    def _repo_info(self, repo_id: str) -> None:
        if repo_id not in self.hub.repos:
            return self._not_found("RepoNotFound", f"Repository {repo_id} not found")
        files = self.hub.repos[repo_id]
        self._json(
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": self.hub.commit(repo_id),
                "private": False,
                "siblings": [{"rfilename": name} for name in sorted(files)],
            }
        )

    def _tree(self, repo_id: str) -> None:
        if repo_id not in self.hub.repos:
            return self._not_found("RepoNotFound", f"Repository {repo_id} not found")
        entries = []
        for name, data in sorted(self.hub.repos[repo_id].items()):
            entry = {"type": "file", "path": name, "size": len(data), "oid": _blob_id(data)}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(entries)

    def _resolve(self, repo_id: str, filename: str) -> None:
        files = self.hub.repos.get(repo_id)
        if files is None:
            return self._not_found("RepoNotFound", f"Repository {repo_id} not found")
        if filename not in files:
            return self._not_found("EntryNotFound", f"{filename} not found in {repo_id}")
        data = files[filename]
        etag = hashlib.sha256(data).hexdigest() if filename.endswith(LFS_SUFFIXES) else _blob_id(data)
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
            start = int(match.group(1))
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", self.hub.commit(repo_id))
        if filename.endswith(LFS_SUFFIXES):
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if self.command == "HEAD":
            return
        cut = self.hub.fail_after_bytes.pop(f"{repo_id}/{filename}", None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)
