"""`distill cache`: a recipe's caches built before training, then used by `distill run` as is."""

from __future__ import annotations

from pathlib import Path

import yaml

from cli import main
from testkit.tiny_world import make_tiny_pipeline, tiny_recipe


def test_cache_builds_each_distinct_cache_once_and_the_run_reuses_it(tmp_path: Path, capsys):
    teachers = {
        "a": make_tiny_pipeline(tmp_path / "a", 1),
        "b": make_tiny_pipeline(tmp_path / "b", 2),
    }
    raw = tiny_recipe(tmp_path, teachers)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("# test\n" + yaml.safe_dump(raw))
    capsys.readouterr()

    assert main(["cache", str(recipe), "--no-progress"]) == 0
    out = capsys.readouterr().out
    # Teachers a and b share their VAE and tokenizer: one cache, built once, found again for b.
    assert out.count("latent cache latents-") == 1
    assert "12 pairs from 12 rows (skipped: none)" in out and "images/s" in out
    assert "teacher a:" in out and "teacher b:" in out
    folders = list((tmp_path / "cache").glob("latents-*"))
    assert len(folders) == 1
    mtimes = {p: p.stat().st_mtime_ns for p in folders[0].iterdir()}

    assert main(["run", str(recipe), "--no-progress"]) == 0
    assert "latent cache latents-" not in capsys.readouterr().out  # nothing encoded again
    assert {p: p.stat().st_mtime_ns for p in folders[0].iterdir()} == mtimes
