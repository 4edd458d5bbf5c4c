"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

# --- Hub fixture (tests/hub) ------------------------------------------------------------------------------
# huggingface_hub reads HF_ENDPOINT and HF_HOME when it is first imported, and test modules import it (via
# transformers) at collection time, so the endpoint is reserved and the variables are set here, at conftest
# import. Every test therefore talks to the loopback Hub (never the internet) with a fresh cache; the
# servers themselves start only when a test first asks for `hub`.
from tests.hub import HubServer, prepare_hub_environment

HUB_ENVIRONMENT = prepare_hub_environment()


@pytest.fixture(scope="session")
def hub():
    """The loopback Hub (olah + write API), started once per session: `.endpoint`, `.mirror_dir`, `.token`,
    `.create_repo_from_folder(...)`, `.commit_folder(...)`, `.create_branch(...)`, `.download_count(...)`."""
    with HubServer(HUB_ENVIRONMENT) as server:
        yield server


# --- end of Hub fixture -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`).

    Tiny tensors run faster on one thread than on two, and far faster when other jobs share the cores.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
