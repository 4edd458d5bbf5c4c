"""The one way selfexplain publishes to the Hub: a folder, uploaded in a single commit.

Vectors, trained models and applied models all go through :func:`publish_folder`, so each push is one commit
(never a half-pushed repo) and every push returns the same thing: huggingface_hub's ``CommitInfo``, which is
also the commit URL as a ``str``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

__all__ = ["could_be_repo_id", "publish_folder"]


def publish_folder(
    folder: str | os.PathLike | Callable[[Path], object],
    repo_id: str,
    *,
    commit_message: str,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = None,
) -> CommitInfo:
    """Create ``repo_id`` if needed and upload a folder in one commit.

    ``folder`` is a folder on disk, or a function that writes the files into the temporary folder it is given
    (what ``save_pretrained`` does), so nothing is left behind on disk.

    Example:
        ```python
        >>> commit = publish_folder(vector.save_pretrained, "me/my-vector", commit_message="Upload vector")
        >>> commit.oid, str(commit)  # the commit hash, and its URL
        ```
    """
    if callable(folder):
        with tempfile.TemporaryDirectory() as tmp:
            folder(Path(tmp))
            return publish_folder(
                tmp,
                repo_id,
                commit_message=commit_message,
                token=token,
                private=private,
                revision=revision,
                create_pr=create_pr,
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
            )
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=Path(folder),
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        allow_patterns=list(allow_patterns) if allow_patterns else None,
        ignore_patterns=list(ignore_patterns) if ignore_patterns else None,
    )


def could_be_repo_id(name: str | None) -> bool:
    """Whether ``name`` has the form of a Hub repo id (``"name"`` or ``"namespace/name"``); paths do not."""
    if not name or name.startswith((".", "~", "/")) or "\\" in name or os.path.isabs(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
