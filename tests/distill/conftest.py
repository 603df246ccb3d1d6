"""Fixtures of the engine's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from testkit.tiny_world import make_tiny_pipeline


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny SD v1 teacher pipelines with random weights (seeds 1 and 2), once per module."""
    root = tmp_path_factory.mktemp("teachers")
    return {
        "a": make_tiny_pipeline(root / "a", seed=1),
        "b": make_tiny_pipeline(root / "b", seed=2),
    }
