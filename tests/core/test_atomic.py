"""Atomic writes: the old file or the new one, never a partial one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.atomic import atomic_path, write_text_atomic


def test_a_failed_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as partial:
            partial.write_text("half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_any_writer_can_fill_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "values.npy"
    with atomic_path(target) as partial:
        with partial.open("wb") as handle:  # a handle: np.save would append .npy to a name
            np.save(handle, np.arange(3))
    assert np.load(target).tolist() == [0, 1, 2]
    assert [p.name for p in target.parent.iterdir()] == ["values.npy"]
