"""selfexplain over a real Hub-compatible HTTP server on 127.0.0.1 (olah + a write API; see tests/hub)."""

import pytest
import torch
import transformers
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from PIL import Image

from selfexplain import (
    ExplanationVector,
    IncompatibleExplanationVectorError,
    NotAnExplanationVectorError,
    ViTForSelfExplainingClassification,
    apply_explanation_vector,
)
from selfexplain.cli import main
from selfexplain.data import default_image_processor
from tests._tiny import pixels, tiny_classifier, tiny_self_explaining


@pytest.fixture(scope="module")
def vector() -> ExplanationVector:
    return ExplanationVector.from_models(
        self_explaining=tiny_self_explaining(seed=40),
        prediction_only=tiny_classifier(seed=41),
        base_model="org/tiny-base",
        recommended_alpha=0.5,
        provenance={"source_dataset": "builtin:mnist", "explanation_loss_weight": 1.0},
    )


@pytest.fixture(scope="module")
def published(hub, vector, tmp_path_factory):
    """A classifier with two branches and a vector, committed straight into the mirror."""
    root = tmp_path_factory.mktemp("published")
    classifier = tiny_classifier(seed=42)
    classifier.save_pretrained(root / "clf")
    main_sha = hub.create_repo_from_folder("org/classifier", root / "clf")
    tiny_classifier(seed=43).save_pretrained(root / "clf-v2")
    v2_sha = hub.commit_folder("org/classifier", root / "clf-v2", branch="v2")
    vector.save_pretrained(root / "vec")
    vec_sha = hub.create_repo_from_folder("org/vector", root / "vec")
    return {"classifier": classifier, "main": main_sha, "v2": v2_sha, "vector_sha": vec_sha, "root": root}


def test_from_pretrained_by_branch_and_commit(published):
    x = pixels(2)
    by_branch = ViTForSelfExplainingClassification.from_pretrained("org/classifier").eval()
    by_sha = ViTForSelfExplainingClassification.from_pretrained(
        "org/classifier", revision=published["main"]
    ).eval()
    v2 = ViTForSelfExplainingClassification.from_pretrained("org/classifier", revision="v2").eval()
    with torch.no_grad():
        expected = published["classifier"](x).logits
        assert torch.allclose(by_branch(x).logits, expected, atol=1e-6)
        assert torch.allclose(by_sha(x).logits, expected, atol=1e-6)
        assert not torch.allclose(v2(x).logits, expected, atol=1e-3)


def test_vector_from_pretrained_by_revision(published, vector):
    loaded = ExplanationVector.from_pretrained("org/vector", revision=published["vector_sha"])
    assert all(torch.equal(loaded.tensors[k], vector.tensors[k]) for k in vector.tensors)
    assert loaded.config.recommended_alpha == 0.5


def test_apply_with_both_ids_over_http_and_cache_on_second_call(hub, published, vector):
    first = apply_explanation_vector("org/classifier", "org/vector", revision=published["main"])
    before = (hub.download_count("org/classifier"), hub.download_count("org/vector"))
    second = apply_explanation_vector("org/classifier", "org/vector", revision=published["main"])
    assert (hub.download_count("org/classifier"), hub.download_count("org/vector")) == before
    expected = apply_explanation_vector(published["classifier"], vector, alpha=0.5)
    x = pixels(2)
    with torch.no_grad():
        for model in (first, second):
            assert torch.allclose(
                model(x, explain="all").explanation, expected(x, explain="all").explanation, atol=1e-6
            )


def test_push_pull_apply_is_byte_exact(hub, published, vector, tmp_path):
    commit = vector.push_to_hub("me/pushed-vector", token=hub.token, storage_dtype="float16")
    sha = commit.split("/commit/")[-1] if "/commit/" in commit else None
    pulled = ExplanationVector.from_pretrained("me/pushed-vector", revision=sha)
    vector.save_pretrained(tmp_path / "local", storage_dtype="float16")
    local_bytes = (tmp_path / "local" / "explanation_vector.safetensors").read_bytes()
    remote = hf_hub_download("me/pushed-vector", "explanation_vector.safetensors", revision=sha)
    assert open(remote, "rb").read() == local_bytes
    card = ModelCard.load("me/pushed-vector")
    assert card.data.base_model == "org/tiny-base" and card.data.base_model_relation == "adapter"
    card.validate()
    patched = apply_explanation_vector(
        "org/classifier", "me/pushed-vector", revision=published["main"], alpha=1.0
    )
    manual = apply_explanation_vector(published["classifier"], pulled, alpha=1.0)
    assert all(
        torch.equal(a, b)
        for a, b in zip(patched.state_dict().values(), manual.state_dict().values(), strict=True)
    )


def test_patched_model_push_to_hub_and_reload(hub, published):
    patched = apply_explanation_vector("org/classifier", "org/vector", revision=published["main"])
    patched.push_to_hub("me/explaining-classifier", token=hub.token)
    files = HfApi().list_repo_files("me/explaining-classifier", revision="main")
    assert {"config.json", "model.safetensors", "modeling_self_explaining_vit.py"} <= set(files)
    reloaded = ViTForSelfExplainingClassification.from_pretrained("me/explaining-classifier").eval()
    x = pixels(2)
    with torch.no_grad():
        assert torch.equal(reloaded(x).explanation, patched.eval()(x).explanation)


def test_unknown_repo_and_revision_are_clear_errors(published):
    with pytest.raises(RepositoryNotFoundError):
        ExplanationVector.from_pretrained("org/does-not-exist")
    with pytest.raises(RevisionNotFoundError):
        ExplanationVector.from_pretrained("org/vector", revision="no-such-branch")
    with pytest.raises(OSError, match="org/does-not-exist"):
        apply_explanation_vector("org/does-not-exist", "org/vector")


def test_classifier_where_a_vector_was_expected_and_vice_versa(published):
    with pytest.raises(NotAnExplanationVectorError, match="looks like a model"):
        ExplanationVector.from_pretrained("org/classifier", revision=published["main"])
    with pytest.raises(OSError):
        ViTForSelfExplainingClassification.from_pretrained("org/vector", revision=published["vector_sha"])


def test_vector_for_another_architecture_is_refused_before_downloading_weights(hub, published, tmp_path):
    # `published` puts org/vector on the Hub: under a random test order nothing else may have done it yet.
    tiny_classifier(hidden_size=48).save_pretrained(tmp_path / "wide")
    sha = hub.create_repo_from_folder("org/wide-classifier", tmp_path / "wide")
    with pytest.raises(IncompatibleExplanationVectorError, match="hidden_size: vector 32, model 48"):
        apply_explanation_vector(
            "org/wide-classifier", "org/vector", revision=sha, vector_revision=published["vector_sha"]
        )
    assert hub.download_count("org/wide-classifier", "model.safetensors") == 0


def test_vector_whose_base_differs_warns(published, vector):
    model = ViTForSelfExplainingClassification.from_pretrained("org/classifier", revision=published["main"])
    model.config.selfexplain_base_model = "org/other-base"
    with pytest.warns(UserWarning, match="org/other-base"):
        apply_explanation_vector(model, "org/vector")


def test_the_cli_names_a_hub_vector_given_as_a_model_and_a_model_given_as_a_vector(
    published, tmp_path, capsys
):
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    for argv, message in (
        (
            ["explain", "--model", "org/vector", str(tmp_path / "x.png")],
            "--model org/vector is an explanation vector on the Hub",
        ),
        (
            ["apply", "--model", "org/vector", "--vector", "org/vector"],
            "--model org/vector is an explanation vector on the Hub",
        ),
        (
            ["apply", "--model", "org/classifier", "--vector", "org/classifier"],
            "--vector org/classifier is not an explanation vector",
        ),
    ):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--output-dir", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err, err


def test_an_applied_hub_model_is_pushed_with_its_image_processor(hub, published, tmp_path):
    tiny_classifier(seed=44).save_pretrained(tmp_path / "clf")
    default_image_processor(16).save_pretrained(tmp_path / "clf")
    hub.create_repo_from_folder("org/classifier-with-processor", tmp_path / "clf")
    patched = apply_explanation_vector("org/classifier-with-processor", "org/vector")
    patched.push_to_hub("me/explaining-with-processor", token=hub.token)
    files = HfApi().list_repo_files("me/explaining-with-processor")
    assert {"preprocessor_config.json", "README.md", "model.safetensors"} <= set(files)
    classify = transformers.pipeline("image-classification", model="me/explaining-with-processor")
    assert len(classify(Image.new("RGB", (20, 10)))) == 3
