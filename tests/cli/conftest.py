"""Fixtures shared by the command-line tests."""

import pytest

from tests.conftest import tiny_loaded


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama saved as a local model folder, as a user would pass with --model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_loaded("llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path
