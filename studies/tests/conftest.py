"""The package suite's fixtures, for the studies' own tests (not collected by `make test`: pytest's testpaths is
tests/). Run them with `python -m pytest -q studies/tests` from the repository root."""

from tests.conftest import tiny_llama  # noqa: F401
