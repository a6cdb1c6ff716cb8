"""One tiny PAM, its model directory and the test data for every eval test (session scope:
built and compiled once)."""

import pytest

from tests.eval import tiny


@pytest.fixture(scope="session")
def tiny_pam():
    """(model, tokenizer)."""
    return tiny.model(), tiny.tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_pam, tmp_path_factory):
    return tiny.save_model_dir(*tiny_pam, tmp_path_factory.mktemp("pamdir"))


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return tiny.write_data(tmp_path_factory.mktemp("evaldata"))
