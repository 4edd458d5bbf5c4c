"""The Hub's write endpoints, for the loopback test Hub (olah itself only serves reads).

Each endpoint answers the requests and JSON that the stock ``huggingface_hub`` client sends (checked
against huggingface_hub 2.4: ``HfApi.create_repo``, ``preupload_lfs_files``, ``create_commit``,
``upload_folder``, ``create_branch``, ``whoami``, ``RepoCard.validate``) and writes git commits into olah's
mirror folder, from where olah serves them. Every file is uploaded "regular" (base64 inside the commit
payload), so no LFS or Xet storage is involved.

This module is HTTP-free: ``handle(request, context)`` maps a parsed request to a ``Reply`` or returns
None for requests it does not own (the front server forwards those to olah).

Example:
    >>> ctx = WriteContext(mirror_dir=tmp_path, endpoint="http://127.0.0.1:8000", token="hf_test_token")  # doctest: +SKIP
    >>> handle(Request("GET", "/api/whoami-v2", {}, {"authorization": "Bearer hf_test_token"}, b""), ctx)  # doctest: +SKIP
    Reply(status=200, ...)
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

from . import git_mirror

USER_NAME = "hub-test-user"

# Written as the first commit of every repo created through the API, like the real Hub does.
INITIAL_GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""

URL_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_REPO_PATH = r"/api/(?P<types>models|datasets|spaces)/(?P<org>[^/]+)/(?P<name>[^/]+)"
_YAML_BLOCK = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


@dataclass(frozen=True)
class Request:
    """A parsed HTTP request: ``headers`` keys are lower-case, ``query`` holds the last value per key."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes


@dataclass
class Reply:
    """An HTTP answer: status, body and headers (``Content-Length`` is added by the server)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200) -> Reply:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    @classmethod
    def error(cls, status: int, message: str, code: str | None = None) -> Reply:
        """An error the way the Hub sends it: ``X-Error-Code`` picks the client's exception class."""
        reply = cls.json({"error": message}, status)
        reply.headers["X-Error-Message"] = message
        if code:
            reply.headers["X-Error-Code"] = code
        return reply


@dataclass
class WriteContext:
    """What the write endpoints need: the mirror folder, the public endpoint URL and the accepted token."""

    mirror_dir: Path
    endpoint: str
    token: str
    # One writer at a time: a commit reads the branch head, then moves it.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.endpoint}/{prefix}{repo_id}"


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.reply = Reply.error(status, message, code)


def handle(request: Request, ctx: WriteContext) -> Reply | None:
    """Answer ``request`` if it is one of the write endpoints (or whoami / validate-yaml), else return None."""
    for method, pattern, endpoint in _ROUTES:
        match = pattern.fullmatch(request.path)
        if match and request.method == method:
            try:
                return endpoint(request, ctx, {k: unquote(v) for k, v in match.groupdict().items()})
            except _HubError as err:
                return err.reply
            except git_mirror.GitMirrorError as err:
                return Reply.error(500, str(err))
    return None


# --- helpers -------------------------------------------------------------------------------------------


def _require_token(request: Request, ctx: WriteContext) -> None:
    auth = request.headers.get("authorization", "")
    given = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
    if not hmac.compare_digest(given.encode(), ctx.token.encode()):
        # This exact message makes huggingface_hub raise a plain 401 instead of RepositoryNotFoundError.
        raise _HubError(401, "Invalid credentials in Authorization header")


def _json_body(request: Request) -> dict[str, Any]:
    try:
        payload = json.loads(request.body or b"{}")
    except ValueError as err:
        raise _HubError(400, f"request body is not valid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise _HubError(400, "request body must be a JSON object")
    return payload


def _existing_repo(ctx: WriteContext, params: Mapping[str, str]) -> tuple[str, str, Path]:
    repo_type = URL_REPO_TYPES[params["types"]]
    repo_id = f"{params['org']}/{params['name']}"
    try:
        path = git_mirror.repo_dir(ctx.mirror_dir, repo_id, repo_type)
    except ValueError as err:
        raise _HubError(400, str(err)) from None
    if not path.is_dir():
        raise _HubError(404, f"Repository {repo_id!r} not found", "RepoNotFound")
    return repo_type, repo_id, path


def _existing_branch(path: Path, revision: str) -> str:
    if not git_mirror.branch_exists(path, revision):
        raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
    return revision


def _reject_pull_requests(request: Request) -> None:
    if request.query.get("create_pr") in ("1", "true", "True"):
        raise _HubError(
            400, "create_pr is not supported by the loopback test Hub: commit to a branch instead"
        )


# --- endpoints -----------------------------------------------------------------------------------------


def _create_repo(request: Request, ctx: WriteContext, params: Mapping[str, str]) -> Reply:
    """``POST /api/repos/create``: a new repo with an initial ``.gitattributes`` commit, or 409."""
    _require_token(request, ctx)
    payload = _json_body(request)
    repo_type = payload.get("type") or "model"
    if repo_type not in git_mirror.REPO_TYPE_FOLDERS:
        raise _HubError(400, f"Invalid repo type {repo_type!r}")
    repo_id = f"{payload.get('organization') or USER_NAME}/{payload.get('name')}"
    try:
        path = git_mirror.repo_dir(ctx.mirror_dir, repo_id, repo_type)
    except ValueError as err:
        raise _HubError(400, str(err)) from None
    url = ctx.repo_url(repo_type, repo_id)
    with ctx.lock:
        if path.exists():
            return Reply.json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        git_mirror.init_repo(ctx.mirror_dir, repo_id, repo_type)
        git_mirror.commit_changes(
            path, "main", {".gitattributes": INITIAL_GITATTRIBUTES}, message="initial commit"
        )
    return Reply.json({"url": url, "name": repo_id, "id": repo_id})


def _preupload(request: Request, ctx: WriteContext, params: Mapping[str, str]) -> Reply:
    """``POST .../preupload/{revision}``: every file "regular"; ``oid`` lets the client skip unchanged files."""
    _require_token(request, ctx)
    _reject_pull_requests(request)
    _, _, path = _existing_repo(ctx, params)
    revision = _existing_branch(path, params["revision"])
    files = _json_body(request).get("files")
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and isinstance(f.get("path"), str) for f in files
    ):
        raise _HubError(400, "'files' must be a list of objects with a 'path'")
    answers = [
        {
            "path": f["path"],
            "uploadMode": "regular",
            "shouldIgnore": False,
            "oid": git_mirror.blob_sha(path, f"refs/heads/{revision}", f["path"]),
        }
        for f in files
    ]
    return Reply.json({"files": answers})


def _parse_commit_payload(body: bytes) -> tuple[dict[str, Any], dict[str, bytes], list[str], list[str]]:
    """Split the NDJSON commit payload into (header, additions, deleted files, deleted folders)."""
    header: dict[str, Any] | None = None
    additions: dict[str, bytes] = {}
    deleted_files: list[str] = []
    deleted_folders: list[str] = []
    for number, line in enumerate(body.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
        except (ValueError, KeyError, TypeError):
            raise _HubError(
                400, f"commit payload line {number} is not a {{'key', 'value'}} JSON object"
            ) from None
        if key != "header" and not (isinstance(value, dict) and isinstance(value.get("path"), str)):
            raise _HubError(400, f"commit payload line {number}: {key!r} needs a 'path' string")
        if key == "header":
            header = value
        elif key == "file":
            if value.get("encoding") != "base64":
                raise _HubError(400, f"file {value.get('path')!r}: only base64 encoding is supported")
            try:
                additions[value["path"]] = base64.b64decode(value["content"], validate=True)
            except (binascii.Error, KeyError, TypeError):
                raise _HubError(400, f"file {value.get('path')!r}: content is not valid base64") from None
        elif key == "deletedFile":
            deleted_files.append(value["path"])
        elif key == "deletedFolder":
            deleted_folders.append(value["path"])
        elif key == "lfsFile":
            raise _HubError(
                400, f"LFS file {value.get('path')!r}: the loopback Hub stores regular files only"
            )
        else:
            raise _HubError(400, f"unknown commit operation {key!r} on line {number}")
    if not header or not str(header.get("summary", "")).strip():
        raise _HubError(400, "commit payload has no header with a non-empty 'summary'")
    return header, additions, deleted_files, deleted_folders


def _commit(request: Request, ctx: WriteContext, params: Mapping[str, str]) -> Reply:
    """``POST .../commit/{revision}``: NDJSON header + operations -> one git commit on that branch."""
    _require_token(request, ctx)
    _reject_pull_requests(request)
    repo_type, repo_id, path = _existing_repo(ctx, params)
    header, additions, deleted_files, deleted_folders = _parse_commit_payload(request.body)
    with ctx.lock:
        branch = _existing_branch(path, params["revision"])
        deletions = list(deleted_files)
        for folder in deleted_folders:
            inside = git_mirror.list_files(path, f"refs/heads/{branch}", folder)
            if not inside:
                raise _HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
            deletions += inside
        # A file re-added in the same commit is replaced, not deleted.
        deletions = sorted(set(deletions) - set(additions))
        try:
            sha = git_mirror.commit_changes(
                path,
                branch,
                additions,
                deletions,
                message=str(header["summary"]),
                description=str(header.get("description") or ""),
                expected_parent=header.get("parentCommit"),
            )
        except FileNotFoundError as err:
            raise _HubError(404, f"A file with this name doesn't exist: {err}", "EntryNotFound") from None
        except ValueError as err:
            status = 412 if "expected parent" in str(err) else 400
            raise _HubError(status, str(err)) from None
    return Reply.json(
        {
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{ctx.repo_url(repo_type, repo_id)}/commit/{sha}",
            "hookOutput": "",
        }
    )


def _create_branch(request: Request, ctx: WriteContext, params: Mapping[str, str]) -> Reply:
    """``POST .../branch/{branch}``: a branch at ``startingPoint`` (default: the default branch), or 409."""
    _require_token(request, ctx)
    _, _, path = _existing_repo(ctx, params)
    start = _json_body(request).get("startingPoint") or git_mirror.default_branch(path)
    with ctx.lock:
        if git_mirror.branch_exists(path, params["branch"]):
            return Reply.error(409, f"Reference already exists: refs/heads/{params['branch']}")
        try:
            git_mirror.create_branch(path, params["branch"], start)
        except ValueError as err:
            raise _HubError(400, str(err)) from None
    return Reply.json({})


def _whoami(request: Request, ctx: WriteContext, params: Mapping[str, str]) -> Reply:
    """``GET /api/whoami-v2``: the test user, with write access to every organization."""
    _require_token(request, ctx)
    return Reply.json(
        {
            "type": "user",
            "id": "0" * 24,
            "name": USER_NAME,
            "fullname": "Hub Test User",
            "isPro": False,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "hub-tests", "role": "write"}},
        }
    )


def _validate_yaml(request: Request, ctx: WriteContext, params: Mapping[str, str]) -> Reply:
    """``POST /api/validate-yaml``: check a card's metadata (see ``validate_card_metadata``)."""
    content = _json_body(request).get("content")
    if not isinstance(content, str):
        raise _HubError(400, "'content' must be the text of the card")
    errors, warnings = validate_card_metadata(content)
    if errors and "text/plain" in request.headers.get("accept", ""):
        return Reply(400, "\n".join(errors).encode(), {"Content-Type": "text/plain"})
    payload = {"errors": [{"message": m} for m in errors], "warnings": [{"message": m} for m in warnings]}
    return Reply.json(payload, 400 if errors else 200)


def validate_card_metadata(content: str) -> tuple[list[str], list[str]]:
    """Check the YAML block of a repo card the way the Hub does for the fields this project writes.

    A subset of the Hub's checks: the block parses to a mapping; ``license``, ``library_name`` and
    ``pipeline_tag`` are strings; ``tags``, ``datasets``, ``metrics``, ``language`` are strings or lists of
    strings; ``base_model`` names repo ids; ``base_model_relation`` is one the Hub knows and comes with a
    ``base_model``; ``model-index`` entries have a name and results with task type, dataset type and name,
    and metrics with type and value.

    Returns:
        (errors, warnings): a card with errors is rejected; no metadata at all is only a warning.

    Example:
        >>> validate_card_metadata("---\\nlicense: mit\\ntags: [a]\\n---\\n# Card")
        ([], [])
        >>> validate_card_metadata("---\\nbase_model_relation: adapter\\n---\\n")[0]
        ["'base_model_relation' needs a 'base_model'"]
    """
    match = _YAML_BLOCK.search(content)
    if match is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as err:
        return [f"Invalid YAML in repo card metadata: {err}"], []
    if data is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    if not isinstance(data, dict):
        return [f"Repo card metadata must be a YAML mapping, got {type(data).__name__}"], []
    errors: list[str] = []

    def is_str_list(value: Any) -> bool:
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))

    for key in ("license", "library_name", "pipeline_tag"):
        if key in data and not isinstance(data[key], str):
            errors.append(f"'{key}' must be a string")
    for key in ("tags", "datasets", "metrics", "language"):
        if key in data and not is_str_list(data[key]):
            errors.append(f"'{key}' must be a string or a list of strings")
    if "base_model" in data:
        bases = data["base_model"] if isinstance(data["base_model"], list) else [data["base_model"]]
        if not all(isinstance(b, str) and _REPO_ID.match(b) for b in bases):
            errors.append("'base_model' must be a repo id ('org/name') or a list of repo ids")
    if "base_model_relation" in data:
        if data["base_model_relation"] not in _BASE_MODEL_RELATIONS:
            errors.append(f"'base_model_relation' must be one of {list(_BASE_MODEL_RELATIONS)}")
        if "base_model" not in data:
            errors.append("'base_model_relation' needs a 'base_model'")
    if "model-index" in data:
        errors += _model_index_errors(data["model-index"])
    return errors, []


def _model_index_errors(model_index: Any) -> list[str]:
    if not isinstance(model_index, list):
        return ["'model-index' must be a list"]
    errors = []
    for i, entry in enumerate(model_index):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            errors.append(f"'model-index[{i}]' needs a 'name'")
            continue
        for j, result in enumerate(entry.get("results") or []):
            where = f"'model-index[{i}].results[{j}]'"
            task, dataset, metrics = (
                result.get(k) if isinstance(result, dict) else None for k in ("task", "dataset", "metrics")
            )
            if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                errors.append(f"{where} needs 'task.type'")
            if not isinstance(dataset, dict) or not all(
                isinstance(dataset.get(k), str) for k in ("type", "name")
            ):
                errors.append(f"{where} needs 'dataset.type' and 'dataset.name'")
            if not isinstance(metrics, list) or not all(
                isinstance(m, dict) and isinstance(m.get("type"), str) and "value" in m for m in metrics
            ):
                errors.append(f"{where} needs 'metrics' with a 'type' and a 'value' each")
    return errors


_Endpoint = Callable[[Request, WriteContext, Mapping[str, str]], Reply]
_ROUTES: list[tuple[str, re.Pattern[str], _Endpoint]] = [
    ("POST", re.compile(r"/api/repos/create"), _create_repo),
    ("POST", re.compile(_REPO_PATH + r"/preupload/(?P<revision>[^/]+)"), _preupload),
    ("POST", re.compile(_REPO_PATH + r"/commit/(?P<revision>[^/]+)"), _commit),
    ("POST", re.compile(_REPO_PATH + r"/branch/(?P<branch>[^/]+)"), _create_branch),
    ("GET", re.compile(r"/api/whoami-v2"), _whoami),
    ("POST", re.compile(r"/api/validate-yaml"), _validate_yaml),
]
