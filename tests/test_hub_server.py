"""The loopback Hub (tests/hub) against the stock huggingface_hub and transformers clients, over HTTP.

These are server-level tests: they prove that the `hub` fixture behaves like the Hugging Face Hub for every
operation the library's own Hub tests rely on (load by branch and by commit, cache hits, the errors a user
sees, and publishing through the client's real upload path).

The mirror is shared by the whole session, so these tests keep to the "hubsrv/" namespace and other test
modules can own ids such as "org/classifier".
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import ViTForImageClassification

from tests._tiny import tiny_classifier
from tests.hub import validate_card_metadata


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def classifier_repo(hub, tmp_path_factory):
    """The repo "hubsrv/classifier": main holds model v1, branch "v2" (one commit later) another model."""
    v1, v2 = tiny_classifier(seed=0), tiny_classifier(seed=1)
    v1_dir, v2_dir = tmp_path_factory.mktemp("v1"), tmp_path_factory.mktemp("v2")
    v1.save_pretrained(v1_dir)
    v2.save_pretrained(v2_dir)
    sha_v1 = hub.create_repo_from_folder("hubsrv/classifier", v1_dir, message="Add classifier v1")
    sha_v2 = hub.commit_folder("hubsrv/classifier", v2_dir, branch="v2", message="Classifier v2")
    return {"v1": v1, "v2": v2, "sha_v1": sha_v1, "sha_v2": sha_v2}


@pytest.fixture()
def api(hub) -> HfApi:
    return HfApi(token=hub.token)


def test_client_points_at_the_loopback_hub(hub):
    assert hub.endpoint.startswith("http://127.0.0.1:")
    assert huggingface_hub.constants.ENDPOINT == hub.endpoint
    assert Path(huggingface_hub.constants.HF_HUB_CACHE).is_relative_to(hub.environment.hf_home)
    assert hub.token not in repr(hub)


def test_from_pretrained_by_branch_and_by_commit(hub, classifier_repo):
    by_branch = ViTForImageClassification.from_pretrained("hubsrv/classifier")
    by_sha = ViTForImageClassification.from_pretrained(
        "hubsrv/classifier", revision=classifier_repo["sha_v1"]
    )
    v2 = ViTForImageClassification.from_pretrained("hubsrv/classifier", revision="v2")

    _assert_same_weights(by_branch, classifier_repo["v1"])
    _assert_same_weights(by_sha, classifier_repo["v1"])
    _assert_same_weights(v2, classifier_repo["v2"])
    assert not torch.equal(v2.classifier.weight, by_branch.classifier.weight)
    assert classifier_repo["sha_v1"] != classifier_repo["sha_v2"]
    assert all(r.handled_by == "olah" for r in hub.requests if "/resolve/" in r.path)


def test_second_load_is_served_from_the_cache(hub, tmp_path):
    tiny_classifier(seed=2).save_pretrained(tmp_path)
    sha = hub.create_repo_from_folder("hubsrv/cached", tmp_path)

    for revision in ("main", sha):
        ViTForImageClassification.from_pretrained("hubsrv/cached", revision=revision)
        assert hub.download_count("hubsrv/cached", "model.safetensors") == 1

    new_sha = hub.commit_folder("hubsrv/cached", tmp_path, message="Same files, new commit")  # same blobs
    ViTForImageClassification.from_pretrained("hubsrv/cached")
    assert hub.download_count("hubsrv/cached", "model.safetensors") == 1  # the etag matched the cached blob
    assert HfApi().model_info("hubsrv/cached").sha == new_sha != sha  # new commits are served without restart


def test_repo_info_and_refs(api, classifier_repo):
    info = api.model_info("hubsrv/classifier")  # olah alone answers 401 without a revision
    assert info.sha == classifier_repo["sha_v1"]
    assert {s.rfilename for s in info.siblings} == {"config.json", "model.safetensors"}
    refs = {b.name: b.target_commit for b in api.list_repo_refs("hubsrv/classifier").branches}
    assert refs == {"main": classifier_repo["sha_v1"], "v2": classifier_repo["sha_v2"]}


def test_errors_are_the_hubs(hub, classifier_repo):
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("hubsrv/does-not-exist", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("hubsrv/classifier", "config.json", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("hubsrv/classifier", "no-such-file.json")  # by branch name
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("hubsrv/classifier", "no-such-file.json", revision=classifier_repo["sha_v1"])
    with pytest.raises(OSError, match="hubsrv/does-not-exist"):
        ViTForImageClassification.from_pretrained("hubsrv/does-not-exist")
    # A plain GET of a missing file (olah alone answers 500) is the Hub's 404 too.
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(
            f"{hub.endpoint}/hubsrv/classifier/resolve/{classifier_repo['sha_v1']}/nope", timeout=10
        )
    assert (missing.value.code, missing.value.headers["X-Error-Code"]) == (404, "EntryNotFound")


def test_push_then_pull_is_byte_identical(hub, api, tmp_path):
    tiny_classifier(seed=3).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "extra").mkdir()
    (tmp_path / "model" / "extra" / "notes.txt").write_text("nested files keep their path\n")
    api.create_repo("hubsrv/pushed-folder")
    api.create_repo("hubsrv/pushed-folder", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("hubsrv/pushed-folder")
    assert conflict.value.response.status_code == 409

    info = api.upload_folder(
        repo_id="hubsrv/pushed-folder", folder_path=tmp_path / "model", commit_message="Push"
    )
    pulled = Path(snapshot_download("hubsrv/pushed-folder", revision=info.oid))

    assert info.commit_url == f"{hub.endpoint}/hubsrv/pushed-folder/commit/{info.oid}"
    assert _files(pulled) == {
        **_files(tmp_path / "model"),
        ".gitattributes": pulled.joinpath(".gitattributes").read_bytes(),
    }
    pulls = [r for r in hub.requests if r.method == "GET" and "/hubsrv/pushed-folder/resolve/" in r.path]
    assert pulls and all(r.handled_by == "olah" for r in pulls)
    # Unchanged files are skipped by the client (preupload returns their oid): no new commit.
    again = api.upload_folder(
        repo_id="hubsrv/pushed-folder", folder_path=tmp_path / "model", commit_message="Again"
    )
    assert again.oid == info.oid


def test_create_commit_adds_deletes_and_checks_the_parent(hub, api):
    api.create_repo("hubsrv/commits")
    first = api.create_commit(
        "hubsrv/commits",
        [CommitOperationAdd("a.txt", b"a"), CommitOperationAdd("dir/b.txt", b"b")],
        commit_message="Add a and b",
    )
    second = api.create_commit(
        "hubsrv/commits",
        [CommitOperationDelete("dir/"), CommitOperationAdd("a.txt", b"a2")],
        commit_message="Drop dir, change a",
        parent_commit=first.oid,
    )
    assert sorted(api.list_repo_files("hubsrv/commits", revision=first.oid)) == [
        ".gitattributes",
        "a.txt",
        "dir/b.txt",
    ]
    assert sorted(api.list_repo_files("hubsrv/commits", revision=second.oid)) == [".gitattributes", "a.txt"]
    assert Path(hf_hub_download("hubsrv/commits", "a.txt", revision=second.oid)).read_bytes() == b"a2"
    assert Path(hf_hub_download("hubsrv/commits", "a.txt", revision=first.oid)).read_bytes() == b"a"

    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit(
            "hubsrv/commits", [CommitOperationAdd("c.txt", b"c")], commit_message="x", parent_commit=first.oid
        )
    assert stale.value.response.status_code == 412
    with pytest.raises(EntryNotFoundError):
        api.create_commit("hubsrv/commits", [CommitOperationDelete("missing.txt")], commit_message="x")


def test_branches_whoami_and_auth(hub, api):
    api.create_repo("hubsrv/branches")
    api.create_branch("hubsrv/branches", branch="dev")
    api.create_branch("hubsrv/branches", branch="dev", exist_ok=True)
    dev = api.upload_file(
        path_or_fileobj=b"dev", path_in_repo="dev.txt", repo_id="hubsrv/branches", revision="dev"
    )
    main_sha = api.model_info("hubsrv/branches", revision="main").sha

    assert api.model_info("hubsrv/branches", revision="dev").sha == dev.oid != main_sha
    assert "dev.txt" not in api.list_repo_files("hubsrv/branches")
    assert api.whoami()["name"] == "hub-test-user"
    with pytest.raises(HfHubHTTPError) as denied:
        HfApi(token="hf_wrong").create_repo("hubsrv/not-created")
    assert denied.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("hubsrv/not-created", revision="main")


def test_transformers_push_to_hub(hub, api):
    model = tiny_classifier(seed=4)
    commit = model.push_to_hub("hubsrv/pushed", token=hub.token, commit_message="Upload tiny ViT")

    reloaded = ViTForImageClassification.from_pretrained("hubsrv/pushed", revision=commit.oid)
    card = ModelCard.load("hubsrv/pushed")

    _assert_same_weights(reloaded, model)
    assert api.model_info("hubsrv/pushed").sha == commit.oid
    assert card.data.library_name == "transformers"


def test_card_metadata_is_validated(hub):
    good = ModelCard(
        "---\nlicense: apache-2.0\nbase_model: hubsrv/classifier\nbase_model_relation: adapter\n---\n# Card\n"
    )
    good.validate()
    with pytest.raises(ValueError, match="base_model_relation"):
        ModelCard(
            "---\nbase_model: hubsrv/classifier\nbase_model_relation: sibling\n---\n# Card\n"
        ).validate()
    errors, _ = validate_card_metadata("---\nmodel-index:\n- name: x\n  results:\n  - task: {type: t}\n---\n")
    assert errors == [
        "'model-index[0].results[0]' needs 'dataset.type' and 'dataset.name'",
        "'model-index[0].results[0]' needs 'metrics' with a 'type' and a 'value' each",
    ]


def test_dataset_repos(hub, api, tmp_path):
    (tmp_path / "data.csv").write_text("image,label\n0.png,1\n")
    sha = hub.create_repo_from_folder("hubsrv/data", tmp_path, repo_type="dataset")
    api.create_repo("hubsrv/data-pushed", repo_type="dataset")
    pushed = api.upload_folder(repo_id="hubsrv/data-pushed", folder_path=tmp_path, repo_type="dataset")

    assert (
        Path(hf_hub_download("hubsrv/data", "data.csv", repo_type="dataset", revision=sha))
        .read_text()
        .startswith("image")
    )
    assert pushed.commit_url.startswith(f"{hub.endpoint}/datasets/hubsrv/data-pushed/commit/")
    assert api.dataset_info("hubsrv/data-pushed").sha == pushed.oid
