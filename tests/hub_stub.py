"""A stand-in for the Hugging Face Hub's upload endpoints, on loopback, for tests only.

olah (the real mirror used for downloads in the tests) cannot receive uploads, so this server
implements only what huggingface_hub's ``create_repo``, ``repo_info``, ``create_branch`` and ``create_commit``
(card YAML validation, preupload, one NDJSON commit with files sent inline) need, plus ``resolve`` so the publisher can
download back what it uploaded. It stores every commit in memory.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "refs": {rev: oid}, "commits": {oid: files}}
        self.requests: list[tuple[str, str]] = []
        self.auth_headers: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(code)
                for k, v in (headers or {"Content-Type": "application/json"}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, code: int, obj) -> None:
                self._send(code, json.dumps(obj).encode())

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self):
                stub.requests.append(("POST", self.path))
                stub.auth_headers.append(self.headers.get("Authorization", ""))
                body = self._body()
                if self.path == "/api/validate-yaml":  # the Hub checks the card's front matter
                    import yaml

                    content = json.loads(body)["content"]
                    try:
                        yaml.safe_load(content.split("---")[1])
                        return self._json(200, {})
                    except (yaml.YAMLError, IndexError) as e:
                        return self._json(400, {"errors": [{"message": str(e)}]})
                if self.path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    if repo_id in stub.repos:
                        return self._json(409, {"error": "You already created this model repo",
                                                "url": f"{stub.url}/{repo_id}"})
                    private = bool(req.get("private")) or req.get("visibility") == "private"
                    stub.repos[repo_id] = {"private": private, "refs": {"main": None},
                                           "commits": {None: {}}}
                    return self._json(200, {"url": f"{stub.url}/{repo_id}", "name": repo_id})
                m = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)$", self.path)
                if not m or m.group(1) not in stub.repos:
                    return self._json(404, {"error": "not found"})
                repo = stub.repos[m.group(1)]
                rev = m.group(3).replace("%2F", "/").split("?")[0]
                if m.group(2) == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if m.group(2) == "branch":
                    repo["refs"][rev] = repo["refs"]["main"]
                    return self._json(200, {})
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                create_pr = "create_pr=1" in self.path
                base = repo["refs"].get(rev, repo["refs"]["main"])
                files = dict(repo["commits"][base])
                for line in lines:
                    if line["key"] == "file":
                        files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                oid = hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items()))
                                   .encode()).hexdigest()
                repo["commits"][oid] = files
                pr = None
                if create_pr:
                    pr = f"refs/pr/{sum(r.startswith('refs/pr/') for r in repo['refs']) + 1}"
                    repo["refs"][pr] = oid
                else:
                    repo["refs"][rev] = oid
                return self._json(200, {"commitUrl": f"{stub.url}/{m.group(1)}/commit/{oid}", "commitOid": oid,
                                        "pullRequestUrl": f"{stub.url}/{m.group(1)}/discussions/1" if pr else None})

            def _resolve(self, head: bool):
                stub.requests.append(("HEAD" if head else "GET", self.path))
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", self.path.split("?")[0])
                if not m or m.group(1) not in stub.repos:
                    return self._json(404, {"error": "not found"})
                repo = stub.repos[m.group(1)]
                rev = m.group(2).replace("%2F", "/")
                oid = repo["refs"].get(rev, rev if rev in repo["commits"] else None)
                data = repo["commits"].get(oid, {}).get(m.group(3))
                if data is None:
                    return self._send(404, b"{}", {"Content-Type": "application/json", "X-Error-Code": "EntryNotFound"})
                etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                self._send(200, data, {"Content-Type": "application/octet-stream", "X-Repo-Commit": oid,
                                       "ETag": f'"{etag}"'}, head=head)

            def do_HEAD(self):
                self._resolve(head=True)

            def do_GET(self):
                info = re.match(r"^/api/models/([^/]+/[^/]+)$", self.path.split("?")[0])
                if info:  # repo_info: its visibility
                    stub.requests.append(("GET", self.path))
                    repo = stub.repos.get(info.group(1))
                    return self._json(200, {"id": info.group(1), "private": repo["private"],
                                            "sha": repo["refs"]["main"]}) if repo else self._json(404, {})
                self._resolve(head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo["commits"][repo["refs"][rev]]
