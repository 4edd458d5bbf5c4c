"""Hub repositories as bare git repositories in olah's mirror folder, written with git plumbing.

olah serves every git repository found at ``<mirror_dir>/<models|datasets>/<org>/<name>`` as a Hub
repository: branches and tags are git refs, commits are git commits, files are git blobs (no LFS needed).
This module writes such repositories without a working tree, so the same code serves the test helpers
(``create_repo_from_folder``) and the write endpoint that turns a Hub commit into a git commit.

Commits are deterministic: fixed author and committer, and a date derived from the commit's depth in its
history, so the same content pushed the same way always gets the same commit sha.

Example:
    >>> repo = init_repo(mirror_dir, "org/classifier")                                # doctest: +SKIP
    >>> sha = commit_changes(repo, "main", {"config.json": b"{}"}, message="Add config")  # doctest: +SKIP
    >>> resolve_revision(repo, "main") == sha                                          # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

GIT_TIMEOUT_S = 60
DEFAULT_BRANCH = "main"
REPO_TYPE_FOLDERS = {"model": "models", "dataset": "datasets", "space": "spaces"}

# 2024-01-01T00:00:00Z; commit number n of a history is dated n minutes later.
_EPOCH_S = 1_704_067_200
_ZERO_SHA = "0" * 40
_NAME_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_FULL_SHA = re.compile(r"^[0-9a-f]{40}$")


class GitMirrorError(RuntimeError):
    """A git command on a mirror repository failed; the message carries git's own error output."""


def repo_dir(mirror_dir: str | os.PathLike, repo_id: str, repo_type: str = "model") -> Path:
    """Return where olah looks for ``repo_id``: ``<mirror_dir>/<models|datasets|spaces>/<org>/<name>``.

    Raises:
        ValueError: if ``repo_id`` is not ``"org/name"`` with Hub-valid parts or ``repo_type`` is unknown
            (this also keeps ids such as ``"../x"`` from escaping the mirror folder).

    Example:
        >>> repo_dir("/m", "org/classifier").as_posix()
        '/m/models/org/classifier'
    """
    if repo_type not in REPO_TYPE_FOLDERS:
        raise ValueError(f"repo_type must be one of {sorted(REPO_TYPE_FOLDERS)}, got {repo_type!r}")
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if len(parts) != 2 or not all(_NAME_PART.match(p) and ".." not in p and "--" not in p for p in parts):
        raise ValueError(
            f"repo_id must look like 'org/name' (letters, digits, '.', '_', '-'), got {repo_id!r}"
        )
    return Path(mirror_dir, REPO_TYPE_FOLDERS[repo_type], *parts)


def _git_env(depth: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The user's git configuration (signing, hooks, default branch...) must not leak into test repos.
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_TERMINAL_PROMPT="0")
    env.pop("GIT_DIR", None)
    env.pop("GIT_INDEX_FILE", None)
    if depth is not None:
        date = f"{_EPOCH_S + 60 * depth} +0000"
        env.update(
            GIT_AUTHOR_NAME="Hub Test",
            GIT_AUTHOR_EMAIL="hub-test@example.invalid",
            GIT_AUTHOR_DATE=date,
            GIT_COMMITTER_NAME="Hub Test",
            GIT_COMMITTER_EMAIL="hub-test@example.invalid",
            GIT_COMMITTER_DATE=date,
        )
    return env


def git(
    repo: Path,
    *args: str,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> str:
    """Run ``git -C repo args...`` with a timeout and return its stdout stripped of the final newline.

    Raises:
        GitMirrorError: if git exits non-zero and ``check`` is true.
    """
    proc = subprocess.run(
        ["git", "-C", str(repo), *args],
        input=input,
        capture_output=True,
        env=dict(env) if env is not None else _git_env(),
        timeout=GIT_TIMEOUT_S,
        check=False,
    )
    if check and proc.returncode != 0:
        raise GitMirrorError(
            f"git {' '.join(args[:2])} failed in {repo}: {proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout.decode().rstrip("\n")


def init_repo(mirror_dir: str | os.PathLike, repo_id: str, repo_type: str = "model") -> Path:
    """Create an empty bare repository for ``repo_id`` (default branch ``main``) and return its path.

    Raises:
        FileExistsError: if the repository already exists.
    """
    path = repo_dir(mirror_dir, repo_id, repo_type)
    if path.exists():
        raise FileExistsError(f"{repo_type} repository {repo_id!r} already exists at {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    git(path.parent, "init", "--quiet", "--bare", f"--initial-branch={DEFAULT_BRANCH}", path.name)
    return path


def resolve_revision(repo: Path, revision: str) -> str | None:
    """Return the commit sha that ``revision`` (branch, tag or sha) names in ``repo``, or None if none."""
    if not revision or revision.startswith("-") or not repo.is_dir():
        return None
    out = git(repo, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}", check=False)
    return out if _FULL_SHA.match(out) else None


def default_branch(repo: Path) -> str:
    """Return the branch that ``HEAD`` of ``repo`` points to (``main`` for repos made here)."""
    ref = git(repo, "symbolic-ref", "--quiet", "HEAD", check=False)
    return ref.removeprefix("refs/heads/") or DEFAULT_BRANCH


def branch_exists(repo: Path, branch: str) -> bool:
    """Return whether ``refs/heads/<branch>`` exists in ``repo``."""
    return resolve_revision(repo, f"refs/heads/{branch}") is not None


def list_files(repo: Path, revision: str, prefix: str = "") -> list[str]:
    """Return the file paths of ``revision``, optionally only those under the folder ``prefix``."""
    args = ["ls-tree", "-r", "-z", "--name-only", revision]
    if prefix:
        args += ["--", prefix.rstrip("/") + "/"]
    return [p for p in git(repo, *args).split("\0") if p]


def blob_sha(repo: Path, revision: str, path: str) -> str | None:
    """Return the git blob sha of ``path`` at ``revision`` (what the Hub calls a regular file's oid)."""
    out = git(repo, "rev-parse", "--verify", "--quiet", f"{revision}:{path}", check=False)
    return out if _FULL_SHA.match(out) else None


def create_branch(repo: Path, branch: str, start_point: str) -> str:
    """Create ``branch`` at the commit ``start_point`` names and return that sha.

    Raises:
        ValueError: if ``start_point`` names no commit or ``branch`` is not a valid branch name.
        FileExistsError: if the branch already exists.
    """
    sha = resolve_revision(repo, start_point)
    if sha is None:
        raise ValueError(f"start point {start_point!r} names no commit in {repo}")
    if git(repo, "check-ref-format", "--branch", branch, check=False) != branch:
        raise ValueError(f"{branch!r} is not a valid branch name")
    if branch_exists(repo, branch):
        raise FileExistsError(f"branch {branch!r} already exists in {repo}")
    git(repo, "update-ref", f"refs/heads/{branch}", sha, _ZERO_SHA)
    return sha


def check_path_in_repo(path: str) -> str:
    """Return ``path`` if it is a safe relative file path inside a repository, else raise ValueError."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..", ".git") for p in parts) or "\0" in path:
        raise ValueError(f"invalid path in repository: {path!r}")
    return path


def commit_changes(
    repo: Path,
    branch: str,
    additions: Mapping[str, bytes],
    deletions: Iterable[str] = (),
    *,
    message: str,
    description: str = "",
    expected_parent: str | None = None,
) -> str:
    """Commit ``additions`` (path -> bytes) and ``deletions`` (file paths) on top of ``branch``.

    A branch that does not exist yet is created from nothing (this is how a repo gets its first commit).
    The branch moves with a compare-and-swap, so concurrent writers cannot lose each other's commits.

    Args:
        expected_parent: if given, the commit the branch must point to now (the Hub's ``parentCommit``).

    Returns:
        The sha of the new commit.

    Raises:
        ValueError: on an unsafe path, or if ``expected_parent`` is not the branch head.
        FileNotFoundError: if a deleted path is not in the parent commit.
    """
    parent = resolve_revision(repo, f"refs/heads/{branch}")
    if expected_parent is not None and (parent is None or not parent.startswith(expected_parent.lower())):
        raise ValueError(f"branch {branch!r} is at {parent}, not at the expected parent {expected_parent}")
    existing = set(list_files(repo, parent)) if parent else set()
    index_lines: list[str] = []
    for path in deletions:
        if check_path_in_repo(path) not in existing:
            raise FileNotFoundError(f"cannot delete {path!r}: no such file on {branch!r}")
        index_lines.append(f"0 {_ZERO_SHA}\t{path}")
    for path, content in additions.items():
        blob = git(repo, "hash-object", "-w", "--stdin", input=bytes(content))
        index_lines.append(f"100644 {blob}\t{check_path_in_repo(path)}")

    depth = int(git(repo, "rev-list", "--count", parent)) + 1 if parent else 1
    full_message = f"{message}\n\n{description}".rstrip() + "\n"
    with tempfile.TemporaryDirectory(prefix="hub-index-") as tmp:
        # A throw-away index: the bare repository has no working tree and no index of its own.
        env = {**_git_env(depth), "GIT_INDEX_FILE": str(Path(tmp, "index"))}
        git(repo, "read-tree", *([parent] if parent else ["--empty"]), env=env)
        git(
            repo,
            "update-index",
            "--index-info",
            input="".join(f"{line}\n" for line in index_lines).encode(),
            env=env,
        )
        tree = git(repo, "write-tree", env=env)
        parent_args = ["-p", parent] if parent else []
        commit = git(repo, "commit-tree", tree, *parent_args, input=full_message.encode(), env=env)
    # Compare-and-swap: fails if another writer moved the branch since `parent` was read.
    git(repo, "update-ref", f"refs/heads/{branch}", commit, parent or _ZERO_SHA)
    return commit


def read_folder(folder: str | os.PathLike) -> dict[str, bytes]:
    """Return every file under ``folder`` as ``{posix relative path: bytes}``, skipping ``.git`` folders.

    Raises:
        NotADirectoryError: if ``folder`` is not a directory.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"folder must be an existing directory, got {str(folder)!r}")
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and ".git" not in path.relative_to(root).parts
    }


def create_repo_from_folder(
    mirror_dir: str | os.PathLike,
    repo_id: str,
    folder: str | os.PathLike,
    branch: str = DEFAULT_BRANCH,
    message: str = "Add files",
    repo_type: str = "model",
) -> str:
    """Publish the files of ``folder`` as a new Hub repository in olah's mirror and return the commit sha.

    Example:
        >>> model.save_pretrained(tmp_path / "clf")                                            # doctest: +SKIP
        >>> sha = create_repo_from_folder(mirror_dir, "org/classifier", tmp_path / "clf")       # doctest: +SKIP
        >>> ViTForImageClassification.from_pretrained("org/classifier", revision=sha)          # doctest: +SKIP
    """
    files = read_folder(folder)
    repo = init_repo(mirror_dir, repo_id, repo_type)
    if branch != DEFAULT_BRANCH:
        # HEAD must name an existing branch, or olah cannot answer requests without a revision.
        git(repo, "symbolic-ref", "HEAD", f"refs/heads/{branch}")
    return commit_changes(repo, branch, files, message=message)


def commit_folder(
    mirror_dir: str | os.PathLike,
    repo_id: str,
    folder: str | os.PathLike,
    branch: str = DEFAULT_BRANCH,
    message: str = "Update files",
    start_point: str | None = None,
    repo_type: str = "model",
) -> str:
    """Commit the files of ``folder`` to an existing repository and return the new commit sha.

    The commit replaces the whole tree with the folder's content. A ``branch`` that does not exist yet is
    first created at ``start_point`` (default: the repository's default branch), so this is also how a
    test publishes a second branch.

    Raises:
        FileNotFoundError: if the repository does not exist.

    Example:
        >>> sha_v2 = commit_folder(mirror_dir, "org/classifier", tmp_path / "clf_v2", branch="v2")  # doctest: +SKIP
    """
    repo = repo_dir(mirror_dir, repo_id, repo_type)
    if not repo.is_dir():
        raise FileNotFoundError(f"{repo_type} repository {repo_id!r} does not exist in {mirror_dir}")
    files = read_folder(folder)
    if not branch_exists(repo, branch):
        create_branch(repo, branch, start_point or default_branch(repo))
    stale = set(list_files(repo, f"refs/heads/{branch}")) - set(files)
    return commit_changes(repo, branch, files, sorted(stale), message=message)
