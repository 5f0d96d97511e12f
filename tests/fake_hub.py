"""A fake Hugging Face Hub on 127.0.0.1, so that download tests run the real huggingface_hub
client and never touch the network (HF_ENDPOINT points at it).

It serves one repo: the file answers `hf_hub_download` asks for (HEAD and GET of
`[/datasets]/<repo>/resolve/<revision>/<path>`) and the two API calls `snapshot_download` makes
(`/api/<type>s/<repo>/revision/<revision>` with the siblings, `/api/<type>s/<repo>/tree/<revision>`
with sizes and LFS SHA-256s). Every file is answered like the Hub answers for an LFS file.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import urllib.parse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "yifengzhu-hf/LIBERO-datasets"  # the default: LIBERO's demo files (test_libero_data)


class FakeHub:
    """The repo `repo_id` (`repo_type` "dataset" or "model") holding `files` at commit COMMIT.

    `log` keeps the file requests (method, path, Range header); `api_log` the API paths.
    `mode` damages the GET answers of file `target` (None: any file): "cut_once" closes the
    connection mid-body once, "cut_then_fail" does so and then answers 500 for that file,
    "short" ends the body early, "corrupt" flips one byte. `gated` answers file requests like a
    gated repo does to a user without access (401, X-Error-Code GatedRepo)."""

    def __init__(self, files: dict[str, bytes], repo_id: str = REPO_ID,
                 repo_type: str = "dataset"):
        self.files, self.repo_id, self.log, self.api_log = files, repo_id, [], []
        self.mode, self.target, self.gated = None, None, False
        self.sha = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
        hub = self
        prefix = "" if repo_type == "model" else f"/{repo_type}s"
        resolve = re.compile(rf"{prefix}/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")
        api = re.compile(rf"/api/{repo_type}s/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?")

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 20  # a stuck client cannot hold a server thread forever

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _error(self, status: int, code: str):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _json(self, data):
                raw = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _answer(self, body: bool):
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                a = api.fullmatch(path)
                if a is not None:
                    hub.api_log.append(path)
                    if a.group(1) != hub.repo_id:
                        return self._error(404, "RepoNotFound")
                    if a.group(3) not in ("main", COMMIT):
                        return self._error(404, "RevisionNotFound")
                    if a.group(2) == "revision":
                        return self._json({"id": hub.repo_id, "sha": COMMIT, "private": False,
                                           "siblings": [{"rfilename": k} for k in hub.files]})
                    return self._json([{"type": "file", "path": k, "size": len(v),
                                        "oid": hashlib.sha1(v).hexdigest(),
                                        "lfs": {"oid": hub.sha[k], "size": len(v),
                                                "pointerSize": 134}}
                                       for k, v in hub.files.items()])
                m = resolve.fullmatch(path)
                if m is not None:  # (the log keeps file requests, not the client's other calls)
                    hub.log.append((self.command, self.path, self.headers.get("Range")))
                if m is None or m.group(1) != hub.repo_id:
                    return self._error(404, "RepoNotFound")
                if hub.gated:
                    return self._error(401, "GatedRepo")
                if m.group(3) not in hub.files:
                    return self._error(404, "EntryNotFound")
                data = hub.files[m.group(3)]
                mode = hub.mode if hub.target in (None, m.group(3)) and body else None
                if mode == "fail":
                    return self._error(500, "InternalError")
                if mode == "corrupt":
                    data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
                if mode == "short":
                    data = data[: len(data) // 2]
                start = 0
                rng = self.headers.get("Range")
                if body and rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                sha = hub.sha[m.group(3)]
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(hub.files[m.group(3)])))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not body:
                    return
                if mode in ("cut_once", "cut_then_fail"):
                    hub.mode = "fail" if mode == "cut_then_fail" else None
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True  # the body ends early: a dropped connection
                    return
                self.wfile.write(data[start:])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def closed_endpoint() -> str:
    """An HF_ENDPOINT nothing listens on: connections are refused at once (no network)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"
