"""The HTTP front of the loopback test Hub: write endpoints here, every read forwarded to olah.

The Hub client has one endpoint (``HF_ENDPOINT``), so a small threaded server listens there. It answers
the write endpoints itself (``write_api``) and forwards everything else, streaming, with headers and
redirects intact, to olah. It also records every request (for "the second load came from the cache"
assertions) and corrects two olah answers that differ from the real Hub:

- ``GET /api/models/{repo}`` (``model_info`` without a revision) is answered 401 by olah in offline mode;
  the front asks olah for the default branch instead.
- For a repo that exists, olah answers an unknown revision, and a missing file asked by branch name, with
  ``401 RepoNotFound`` (and a GET of a missing file by commit sha with ``500``); the front rewrites these
  to the Hub's ``404 RevisionNotFound`` / ``404 EntryNotFound``, so the client raises
  ``RevisionNotFoundError`` / ``EntryNotFoundError``.
"""

from __future__ import annotations

import http.client
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from . import git_mirror, write_api

UPSTREAM_TIMEOUT_S = 60
_CHUNK = 64 * 1024
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
}
_TYPES = r"(?P<types>models|datasets|spaces)"
_REPO = r"(?P<org>[^/]+)/(?P<name>[^/]+)"
# Read routes whose revision olah resolves; used to tell "unknown revision" from "missing file".
_REVISION_ROUTES = [
    re.compile(rf"/api/{_TYPES}/{_REPO}/(?:revision|tree|paths-info|commits)/(?P<revision>[^/]+)(?:/.*)?"),
    re.compile(rf"/{_TYPES}/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<file>.+)"),
    re.compile(rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<file>.+)"),
]
_REPO_INFO_ROUTE = re.compile(rf"/api/{_TYPES}/{_REPO}/?")


@dataclass(frozen=True)
class RequestRecord:
    """One request the front answered.

    ``handled_by`` is ``"olah"`` (forwarded) or ``"front"`` (a write endpoint); ``rewritten`` marks an olah
    error answer that the front replaced by the real Hub's (see the module docstring).
    """

    method: str
    path: str
    status: int
    handled_by: str
    rewritten: bool = False


class FrontServer(ThreadingHTTPServer):
    """Threaded HTTP server bound at construction, listening only once ``start`` is called.

    Binding early reserves the port for ``HF_ENDPOINT`` before anything imports ``huggingface_hub``;
    until ``start``, connections are refused at once instead of hanging.
    """

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _FrontHandler, bind_and_activate=False)
        self.server_bind()
        self.records: list[RequestRecord] = []
        self.records_lock = threading.Lock()
        self.write_context: write_api.WriteContext | None = None
        self.upstream: tuple[str, int] | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self, upstream: tuple[str, int], write_context: write_api.WriteContext) -> None:
        """Listen and serve in a daemon thread; reads go to ``upstream`` (olah's host, port)."""
        self.upstream, self.write_context = upstream, write_context
        self.server_activate()
        self._thread = threading.Thread(target=self.serve_forever, name="hub-front", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket (safe to call when never started)."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.server_close()

    def record(self, entry: RequestRecord) -> None:
        with self.records_lock:
            self.records.append(entry)


class _FrontHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub client expects
    timeout = 30  # drop idle keep-alive connections
    server: FrontServer

    def do_GET(self) -> None:
        try:
            self._dispatch()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-answer; nothing left to tell it

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass  # every request is recorded in FrontServer.records instead of printed

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        body = self._read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        request = write_api.Request(self.command, split.path, dict(parse_qsl(split.query)), headers, body)
        reply = write_api.handle(request, self.server.write_context)
        if reply is not None:
            self._send_reply(reply)
            self.server.record(RequestRecord(self.command, self.path, reply.status, "front"))
            return
        status, rewritten = self._forward(self._upstream_path(split), body)
        self.server.record(RequestRecord(self.command, self.path, status, "olah", rewritten))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _upstream_path(self, split) -> str:
        """The path to ask olah: repo info without a revision is asked for the default branch."""
        match = _REPO_INFO_ROUTE.fullmatch(split.path)
        repo = self._repo_dir(match) if match and self.command in ("GET", "HEAD") else None
        if repo is not None and repo.is_dir():
            path = f"{split.path.rstrip('/')}/revision/{git_mirror.default_branch(repo)}"
            return f"{path}?{split.query}" if split.query else path
        return self.path

    def _repo_dir(self, match: re.Match[str]) -> Path | None:
        params = match.groupdict()
        repo_type = write_api.URL_REPO_TYPES[params.get("types") or "models"]
        try:
            return git_mirror.repo_dir(
                self.server.write_context.mirror_dir, f"{params['org']}/{params['name']}", repo_type
            )
        except ValueError:
            return None

    def _corrected_error(self, status: int, headers: list[tuple[str, str]]) -> write_api.Reply | None:
        """The Hub's answer where olah gets a missing revision or file of an existing repo wrong.

        olah says ``401 RepoNotFound`` for both (and ``500`` for a GET of a missing file by commit sha);
        the Hub says ``404 RevisionNotFound`` / ``404 EntryNotFound``. Other answers pass unchanged.
        """
        repo_not_found = (
            status == 401 and dict((k.lower(), v) for k, v in headers).get("x-error-code") == "RepoNotFound"
        )
        if not (repo_not_found or status >= 500):
            return None
        path = urlsplit(self.path).path
        for route in _REVISION_ROUTES:
            match = route.fullmatch(path)
            repo = self._repo_dir(match) if match else None
            if repo is None or not repo.is_dir():
                continue
            revision = unquote(match["revision"])
            sha = git_mirror.resolve_revision(repo, revision)
            if sha is None:
                return write_api.Reply.error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            file = match.groupdict().get("file")
            if repo_not_found or (file and git_mirror.blob_sha(repo, sha, unquote(file)) is None):
                return write_api.Reply.error(404, "Entry not found", "EntryNotFound")
        return None

    def _forward(self, path: str, body: bytes) -> tuple[int, bool]:
        """Stream olah's answer to the request back; return (status sent, whether it was rewritten)."""
        host, port = self.server.upstream
        conn = http.client.HTTPConnection(host, port, timeout=UPSTREAM_TIMEOUT_S)
        try:
            # Host is kept, so the redirects olah builds from it point back at this front server.
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"content-length"}
            }
            if body or self.command in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = str(len(body))
            try:
                conn.request(self.command, path, body=body or None, headers=headers)
                upstream = conn.getresponse()
            except (OSError, http.client.HTTPException) as err:
                self._send_reply(write_api.Reply.error(502, f"olah did not answer: {err!r}"))
                return 502, False
            fixed = self._corrected_error(upstream.status, upstream.getheaders())
            if fixed is not None:
                upstream.read()
                self._send_reply(fixed)
                return fixed.status, True
            self._relay(upstream)
            return upstream.status, False
        finally:
            conn.close()

    def _relay(self, upstream: http.client.HTTPResponse) -> None:
        self.send_response(upstream.status, upstream.reason)
        for key, value in upstream.getheaders():
            # send_response already wrote this server's own Date and Server headers.
            if key.lower() not in _HOP_BY_HOP | {"date", "server"}:
                self.send_header(key, value)
        length = upstream.getheader("Content-Length")
        has_body = self.command != "HEAD" and upstream.status not in (204, 304)
        # olah streams files without a length; re-chunk them instead of buffering whole files.
        chunked = has_body and length is None
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if not has_body:
            return
        read = upstream.read if length is not None else upstream.read1
        while chunk := read(_CHUNK):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _send_reply(self, reply: write_api.Reply) -> None:
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)
