"""`distill eval` bad input: one line, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

from cli import main


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_model_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = main(
        ["eval", "--model", str(tmp_path / "nope"), "--prompts", "fashion", "--out", str(out)]
    )
    assert code == 2 and "--model" in _error(capsys)
    assert not out.exists()


def test_prompts_or_protocol_required(tmp_path: Path, capsys) -> None:
    assert main(["eval", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--prompts" in _error(capsys)


def test_empty_prompts_file(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n\n")
    code = main(
        ["eval", "--model", str(tmp_path), "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    )
    assert code == 2 and "prompts" in _error(capsys)


def test_output_that_already_holds_results_needs_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    code = main(["eval", "--model", str(tmp_path), "--prompts", "fashion", "--out", str(out)])
    assert code == 2 and "--overwrite" in _error(capsys)
    assert (out / "metrics.json").read_text() == "{}"


def test_unknown_protocol(tmp_path: Path, capsys) -> None:
    code = main(
        ["eval", "--model", str(tmp_path), "--protocol", "imagenet", "--out", str(tmp_path / "o")]
    )
    assert code == 2 and "imagenet" in _error(capsys)


def _tiny_pipeline_folder(folder: Path) -> Path:
    """A tiny SD-format pipeline (the offline world's components, random weights) saved to disk."""
    import torch
    from diffusers import StableDiffusionPipeline

    from offline.tiny_models import (
        sampling_scheduler,
        tiny_text_encoder,
        tiny_unet,
        tiny_vae,
    )
    from offline.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    pipeline = StableDiffusionPipeline(
        vae=tiny_vae(block_out_channels=(16, 32, 32), image_size=32),
        text_encoder=tiny_text_encoder(seed=0, hidden_size=32),
        tokenizer=build_clip_tokenizer(),
        unet=tiny_unet(block_out_channels=(32, 64), layers_per_block=1),
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


def test_overwrite_deletes_the_generated_images(tmp_path: Path, capsys) -> None:
    """Without a change to the model, a plain rerun would reuse the images (same fingerprint,
    same settings); --overwrite makes them anew."""
    import torch

    model = _tiny_pipeline_folder(tmp_path / "pipeline")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na photo of a dog\n")
    out = tmp_path / "out"
    command = ["eval", "--model", str(model), "--prompts", str(prompts), "--num-images", "2"]
    command += ["--is-splits", "1", "--steps", "2", "--speed-repeats", "1", "--bootstrap", "0"]
    command += ["--out", str(out), "--no-progress"]
    previous_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))  # no Inception head cached: IS n/a, quickly
    try:
        assert main(command) == 0
        image = out / "images" / "student" / "000000.png"
        first = image.stat()
        assert main(command + ["--overwrite"]) == 0
    finally:
        torch.hub.set_dir(previous_hub)
    second = image.stat()
    assert (second.st_ino, second.st_mtime_ns) != (first.st_ino, first.st_mtime_ns)
    assert "n/a¹" in (out / "report.md").read_text()
    capsys.readouterr()


def test_bad_bootstrap_count(tmp_path: Path, capsys) -> None:
    code = main(
        ["eval", "--model", str(tmp_path), "--prompts", "fashion", "--bootstrap", "1"]
        + ["--out", str(tmp_path / "o")]
    )
    assert code == 2 and "--bootstrap" in _error(capsys)


def test_parity_refuses_another_batch_size(tmp_path: Path, capsys) -> None:
    command = ["eval", "--model", str(tmp_path), "--prompts", "fashion", "--out", str(tmp_path)]
    assert main([*command, "--parity", "bk-sdm", "--batch-size", "4"]) == 2
    assert "one image per call" in capsys.readouterr().err
