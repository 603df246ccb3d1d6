"""`distill eval` bad input: one line, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

from distill.cli import main


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
