"""A Hub-compatible server on 127.0.0.1 for the test suite (olah for reads, a loopback write API).

Use it through the session fixture ``hub`` from ``tests/conftest.py``:

    def test_round_trip(hub, tmp_path):
        model.save_pretrained(tmp_path)
        sha = hub.create_repo_from_folder("org/classifier", tmp_path)
        reloaded = ViTForImageClassification.from_pretrained("org/classifier", revision=sha)
        HfApi().upload_folder(repo_id="org/classifier", folder_path=tmp_path, token=hub.token)
"""

from .front import RequestRecord
from .git_mirror import GitMirrorError, commit_folder, create_repo_from_folder, repo_dir
from .server import HubEnvironment, HubServer, OlahProcess, find_olah_python, prepare_hub_environment
from .write_api import validate_card_metadata

__all__ = [
    "GitMirrorError",
    "HubEnvironment",
    "HubServer",
    "OlahProcess",
    "RequestRecord",
    "commit_folder",
    "create_repo_from_folder",
    "find_olah_python",
    "prepare_hub_environment",
    "repo_dir",
    "validate_card_metadata",
]
