from __future__ import annotations

import pytest

from urae.generate import Generator


@pytest.fixture(scope="session")
def tiny_generator() -> Generator:
    """One resident tiny dev-like pipeline shared by the library tests (fp32, CPU)."""
    return Generator.load("tiny", device="cpu", dtype="float32")
