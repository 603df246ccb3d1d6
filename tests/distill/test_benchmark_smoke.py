"""The SD-scale step benchmark, run at toy widths so the script cannot rot unnoticed.

`benchmarks/` is a folder of scripts, not a package: the script is loaded from its file.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from core.cpu_attention import available as attention_kernel_available

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str = "sd_step"):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_step_prints_one_json_object_with_every_figure(capsys):
    benchmark = load_benchmark()
    returned = benchmark.main(["--tiny", "--threads", "1", "--steps", "2", "--json"])
    printed = json.loads(capsys.readouterr().out)  # the whole of stdout is one JSON object

    assert printed == json.loads(json.dumps(returned))
    assert printed["resolution"] == 64 and printed["latent_size"] == 8
    # SD v1.4's layout at toy widths: the base student drops one layer per block.
    assert printed["params"] == {"teacher": 2_446_788, "student": 1_645_572}
    # Stage-output pairs: 4 down blocks, the mid block, 4 up blocks.
    assert len(printed["layer_pairs"]) == 9
    assert len(printed["step_seconds"]["all"]) == 2
    assert set(printed["phase_seconds"]) == {
        "teacher_forward",
        "student_forward",
        "losses",
        "backward",
        "optimizer",
        "ema",
    }
    assert printed["gflop"]["student_forward"] < printed["gflop"]["teacher_forward"]
    memory = printed["memory_gib"]
    assert memory["peak"] >= memory["peak_after_setup"] > 0
    # The split adds up to the peak; a toy's EMA is in memory ("auto"), as large as its weights.
    assert sum(memory["components"].values()) == pytest.approx(memory["peak"])
    assert memory["components"]["ema"] == memory["components"]["student"] > 0
    assert printed["images_per_second"] == pytest.approx(1 / printed["step_seconds"]["median"])
    assert (
        0
        < printed["fraction_of_bf16_peak"]
        == pytest.approx(printed["gflop_per_second"] / printed["bf16_matmul_peak_gflop_per_second"])
    )


@pytest.mark.e2e  # 14 s of tracing; tests/distill/test_compile.py covers the engine in `make test`
def test_tiny_step_runs_bk_sdm_losses_compiled_without_recompiling(capsys):
    """The `--compile` path (regional, aot_eager here: inductor's C++ build takes minutes on 2
    cores) settles in its warm-up: no new graph in the timed steps."""
    benchmark = load_benchmark()
    result = benchmark.main(
        ["--tiny", "--threads", "1", "--steps", "1", "--warmup-steps", "1", "--losses", "bk-sdm"]
        + ["--compile", "--compile-backend", "aot_eager", "--json"]
    )
    assert set(result["loss_terms"]) == {"task", "output_kd", "feature_kd", "total"}
    assert result["compiled_blocks"] > 0
    assert result["dynamo"]["end"] == result["dynamo"]["after_warmup"]
    assert result["dynamo"]["end"]["graph_breaks"] == 0


def test_tiny_step_runs_the_three_stage3_losses_with_unit_weights(capsys):
    result = load_benchmark().main(
        ["--tiny", "--threads", "1", "--steps", "1", "--gradient-checkpointing", "selective"]
        + ["--profile", "4"]
    )
    report = capsys.readouterr().out

    terms = result["loss_terms"]
    assert set(terms) == {"task", "output_kd", "similarity", "total"}
    assert all(math.isfinite(value) and value >= 0 for value in terms.values())
    assert terms["total"] == pytest.approx(terms["task"] + terms["output_kd"] + terms["similarity"])
    assert "seconds per step over 1: median" in report
    assert "load average" in report
    assert "selective gradient checkpointing" in report
    # The profiled step's four costliest ops, costliest first, also in the report.
    seconds = [row["self_seconds"] for row in result["profile"]]
    assert len(seconds) == 4 and seconds == sorted(seconds, reverse=True) and seconds[0] > 0
    assert all(f"calls  {row['op']}" in report for row in result["profile"])


def test_resolution_must_be_a_multiple_of_the_unet_downsampling():
    benchmark = load_benchmark()
    with pytest.raises(SystemExit) as raised:
        benchmark.parse_args(["--tiny", "--resolution", "96"])
    assert raised.value.code == 2
    assert benchmark.parse_args(["--tiny", "--resolution", "128"]).resolution == 128


def test_pair_magnitudes_prints_every_pair_raw_and_normalized(capsys):
    results = load_benchmark("pair_magnitudes").main(["sd", "--tiny", "--batches", "1"])
    report = capsys.readouterr().out
    assert set(results) == {
        "similarity",
        "similarity_normalized",
        "feature_kd",
        "feature_kd_normalized",
    }
    assert list(results["similarity"]) == [
        *(f"down_blocks.{i}" for i in range(4)),
        "mid_block",
        *(f"up_blocks.{i}" for i in range(4)),
    ]
    assert report.count("\n| `") == 9
    # Normalizing by the teacher's mean square changes each pair by its own factor.
    ratios = [
        results["feature_kd_normalized"][pair] / results["feature_kd"][pair]
        for pair in results["feature_kd"]
    ]
    assert max(ratios) > 1.5 * min(ratios)


@pytest.mark.e2e
def test_cache_precision_runs_both_dtypes_and_draws_their_curves(tmp_path, capsys):
    from testkit.tiny_world import make_tiny_pipeline

    teacher = make_tiny_pipeline(tmp_path / "teacher", 1)
    out = tmp_path / "curves.png"
    argv = ["--teacher", str(teacher), "--steps", "10", "--window", "1", "--max-samples", "16"]
    curves = load_benchmark("cache_precision").main([*argv, "--out", str(out)])
    assert set(curves) == {"float16", "float32"}
    for term in ("loss/task", "loss/output_kd"):
        assert [s for s, _ in curves["float16"][term]] == [5, 10]
        half, full = curves["float16"][term], curves["float32"][term]
        # fp16 rounding of the posterior moves a loss by far less than a percent
        assert all(abs(h - f) <= 0.01 * f for (_, h), (_, f) in zip(half, full, strict=True))
    assert out.stat().st_size > 0
    assert "largest relative gap" in capsys.readouterr().out


@pytest.mark.skipif(
    not attention_kernel_available(),
    reason="the attention kernel needs x86 with AVX512-BF16 and g++",
)
def test_the_attention_benchmark_times_both_kernels_and_the_routing(capsys):
    benchmark = load_benchmark("attention_kernel")
    returned = benchmark.main(["--max-tokens", "1024", "--repeats", "1", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(returned))
    assert [row["shape"] for row in printed["rows"]] == [
        "self 32×32",
        "self 16×16",
        "self 8×8",
        "cross 32×32",
    ]
    passes = ("torch_forward", "kernel_forward", "torch_backward", "kernel_backward")
    for row in printed["rows"]:
        assert all(row[name] > 0 for name in passes), row
    assert set(printed["step_ms"]) == {"torch", "kernel", "routed"}
    assert all(value > 0 for value in printed["step_ms"].values())
