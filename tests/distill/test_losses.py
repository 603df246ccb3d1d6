"""Distillation losses against hand-computed values, and their invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from core.errors import UserInputError
from distill.losses import (
    LOSSES,
    AttentionRelationLoss,
    FeatureKDLoss,
    OutputKDLoss,
    SimilarityMatchingLoss,
    TaskLoss,
    attention_relation_log_probs,
    build_losses,
    pooled_grid_size,
    reads_teacher,
    similarity_matrix,
    task_target,
    validate_loss_blocks,
    weighted_total,
)
from testkit.records import features, step_outputs

# --- task ---------------------------------------------------------------------------------------


def test_epsilon_target_is_the_noise():
    noise = torch.randn(2, 4, 3, 3)
    target = task_target("epsilon", torch.randn(2, 4, 3, 3), noise, torch.tensor([1, 2]), None)
    assert target is noise


def test_v_target_equals_diffusers_get_velocity():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 5, 5, generator=generator)
    noise = torch.randn(3, 4, 5, 5, generator=generator)
    timesteps = torch.tensor([0, 480, 999])
    target = task_target(
        "v_prediction", latents, noise, timesteps, scheduler.alphas_cumprod.clone()
    )
    torch.testing.assert_close(target, scheduler.get_velocity(latents, noise, timesteps))
    # At t=999 ᾱ ≈ 0.0047: v is close to −x0, far from ε. The two targets really differ.
    assert not torch.allclose(target, noise, atol=0.1)


def test_unknown_prediction_type_lists_the_valid_ones():
    with pytest.raises(UserInputError, match="'sample'.*epsilon, v_prediction"):
        task_target("sample", torch.zeros(1), torch.zeros(1), torch.tensor([0]), torch.ones(1))


def test_task_loss_is_the_mean_squared_error():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    terms = TaskLoss()(step_outputs(student_pred=pred, target=torch.zeros(2, 2)))
    assert terms == {"task": torch.tensor(7.5)}  # (1+4+9+16)/4


# --- output KD ----------------------------------------------------------------------------------


def test_output_kd_value_and_no_gradient_reaches_the_teacher():
    student = torch.tensor([1.0, 3.0], requires_grad=True)
    teacher = torch.tensor([0.0, 1.0], requires_grad=True)
    terms = OutputKDLoss()(step_outputs(student_pred=student, teacher_pred=teacher))
    assert terms["output_kd"].item() == pytest.approx(2.5)  # (1 + 4) / 2
    terms["output_kd"].backward()
    torch.testing.assert_close(student.grad, torch.tensor([1.0, 2.0]))  # 2·(s − t) / 2
    assert teacher.grad is None


# --- feature KD ---------------------------------------------------------------------------------


def test_feature_kd_sums_the_mse_of_every_pair():
    student = {"a": torch.ones(1, 2, 2, 2), "b": torch.zeros(1, 3)}
    teacher = {"x": torch.zeros(1, 2, 2, 2), "y": torch.tensor([[1.0, 2.0, 2.0]])}
    terms = FeatureKDLoss(layer_pairs=[("a", "x"), ("b", "y")])(features(student, teacher))
    assert terms["feature_kd"].item() == pytest.approx(1.0 + 3.0)  # 1 + (1+4+4)/3


def test_feature_kd_shape_mismatch_names_the_pair():
    student = {"down_blocks.0": torch.zeros(1, 4, 2, 2)}
    teacher = {"down_blocks.0": torch.zeros(1, 8, 2, 2)}
    loss = FeatureKDLoss(layer_pairs=[("down_blocks.0", "down_blocks.0")])
    with pytest.raises(UserInputError, match=r"\('down_blocks.0', 'down_blocks.0'\).*similarity"):
        loss(features(student, teacher))


def test_feature_losses_reject_missing_features_and_empty_pairs():
    loss = FeatureKDLoss(layer_pairs=[("mid_block", "mid_block")])
    with pytest.raises(KeyError, match="no teacher feature captured for 'mid_block'"):
        loss(features({"mid_block": torch.zeros(1)}, {}))
    with pytest.raises(UserInputError, match="at least one"):
        SimilarityMatchingLoss(layer_pairs=[])


# --- similarity ---------------------------------------------------------------------------------


def test_similarity_matrix_by_hand():
    # (B=1, C=2, H=2, W=1): channel 0 = [1, 2], channel 1 = [3, 4] down the two positions,
    # so H = [[1, 3], [2, 4]] and G = H·Hᵀ / 2.
    features = torch.tensor([[[[1.0], [2.0]], [[3.0], [4.0]]]])
    expected = torch.tensor([[[10.0, 14.0], [14.0, 20.0]]]) / 2
    torch.testing.assert_close(similarity_matrix(features, max_positions=4), expected)
    # The same features as tokens (B, N, C) give the same G.
    tokens = torch.tensor([[[1.0, 3.0], [2.0, 4.0]]])
    torch.testing.assert_close(similarity_matrix(tokens, max_positions=4), expected)


@pytest.mark.parametrize(
    ("height", "width", "cap", "expected"),
    [
        (64, 64, 256, (16, 16)),  # SD at 512 px: 4096 positions -> 256
        (64, 64, 300, (17, 17)),
        (8, 128, 256, (4, 64)),  # aspect ratio kept
        (4096, 1, 2, (2, 1)),
        (8, 8, 256, (8, 8)),  # within the cap: untouched
    ],
)
def test_pooled_grid_respects_the_cap(height, width, cap, expected):
    pooled = pooled_grid_size(height, width, cap)
    assert pooled == expected
    assert pooled[0] * pooled[1] <= cap


def test_similarity_pools_spatial_maps_to_the_cap():
    features = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    gram = similarity_matrix(features, max_positions=64)
    assert gram.shape == (2, 64, 64)
    torch.testing.assert_close(gram, similarity_matrix(F.avg_pool2d(features, 2), 64))
    # Square token sequences (B, H·W, C) are pooled on their grid, like the map they came from.
    tokens = features.flatten(2).transpose(1, 2)
    torch.testing.assert_close(similarity_matrix(tokens, max_positions=64), gram)
    # Non-square sequences pool along the sequence.
    assert similarity_matrix(torch.randn(1, 300, 4), max_positions=64).shape == (1, 64, 64)


def test_similarity_loss_is_width_independent():
    student = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    # A teacher twice as wide that repeats the student's channels has G_T = 2·H·Hᵀ / 8 = G_S.
    teacher = torch.cat([student, student], dim=1)
    similarity = SimilarityMatchingLoss(layer_pairs=[("s", "t")])
    loss = similarity(features({"s": student}, {"t": teacher}))
    assert loss["similarity"].item() == pytest.approx(0.0, abs=1e-6)
    other_teacher = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(2))
    loss = similarity(features({"s": student}, {"t": other_teacher}))
    assert loss["similarity"].item() > 0.01


def test_similarity_loss_sums_pairs_by_hand():
    student = {"a": torch.tensor([[[[1.0], [2.0]], [[3.0], [4.0]]]]), "b": torch.ones(1, 1, 2, 1)}
    teacher = {"a": torch.zeros(1, 5, 2, 1), "b": torch.zeros(1, 3, 2, 1)}
    loss = SimilarityMatchingLoss(layer_pairs=[("a", "a"), ("b", "b")])(features(student, teacher))
    # G_a = [[5, 7], [7, 10]] -> (25+49+49+100)/4; G_b = ones(2, 2) -> 1.
    assert loss["similarity"].item() == pytest.approx(223 / 4 + 1)


def test_similarity_is_fp32_under_bf16_autocast():
    features = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(3))
    reference = similarity_matrix(features, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = features.flatten(2)  # (B, C, N)
        assert torch.bmm(tokens, tokens.transpose(1, 2)).dtype == torch.bfloat16  # autocast is on
        gram = similarity_matrix(features, 16)
    assert gram.dtype == torch.float32
    torch.testing.assert_close(gram, reference)


def test_similarity_gradients_reach_the_student_only():
    student = torch.randn(1, 4, 2, 2, requires_grad=True)
    teacher = torch.randn(1, 8, 2, 2, requires_grad=True)
    loss = SimilarityMatchingLoss(layer_pairs=[("s", "t")])
    loss(features({"s": student}, {"t": teacher}))["similarity"].backward()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_similarity_spatial_mismatch_names_the_pair():
    loss = SimilarityMatchingLoss(layer_pairs=[("s", "t")])
    with pytest.raises(UserInputError, match=r"\('s', 't'\).*same batch and spatial size"):
        loss(features({"s": torch.zeros(1, 4, 2, 2)}, {"t": torch.zeros(1, 4, 4, 4)}))


# --- attention relation -------------------------------------------------------------------------


def test_attention_relation_kl_by_hand():
    # One relation head over N=2 positions, width 2. Teacher queries e0, e1: scores I/√2, so each
    # row is (p, 1−p) with p = sigmoid(1/√2) (up to order). Student queries 0: rows uniform.
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    student = torch.zeros(1, 2, 2)
    p = 1 / (1 + math.exp(-1 / math.sqrt(2)))
    expected = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    loss = AttentionRelationLoss(layer_pairs=[("s", "t")], relation_heads=1)
    terms = loss(features({"s": student}, {"t": teacher}))
    assert terms["attention_relation"].item() == pytest.approx(expected, rel=1e-6)


def test_attention_relations_are_row_distributions_per_head():
    log_probs = attention_relation_log_probs(torch.randn(2, 5, 8), relation_heads=4)
    assert log_probs.shape == (2, 4, 5, 5)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, 4, 5))


def test_attention_relation_is_width_independent():
    student = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(4))
    # Teacher of width 8, R=2 heads of width 4: each head is the student's head (width 2) padded
    # with zeros and scaled by 2^(1/4), so Q_r·Q_rᵀ/√4 = S_r·S_rᵀ/√2 and the relations are equal.
    heads = student.reshape(2, 6, 2, 2)
    teacher = torch.cat([heads, torch.zeros_like(heads)], dim=-1).reshape(2, 6, 8) * 2**0.25
    loss = AttentionRelationLoss(layer_pairs=[("s", "t")], relation_heads=2)
    terms = loss(features({"s": student}, {"t": teacher}))
    assert terms["attention_relation"].item() == pytest.approx(0.0, abs=1e-6)


def test_attention_relation_gradients_reach_the_student_only():
    student = torch.randn(1, 4, 8, requires_grad=True)
    teacher = torch.randn(1, 4, 16, requires_grad=True)
    loss = AttentionRelationLoss(layer_pairs=[("s", "t")], relation_heads=4)
    loss(features({"s": student}, {"t": teacher}))["attention_relation"].backward()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_attention_relation_rejects_bad_widths_and_maps():
    loss = AttentionRelationLoss(layer_pairs=[("s", "t")])
    with pytest.raises(UserInputError, match="divisible by relation_heads=8"):
        loss(features({"s": torch.zeros(1, 4, 12)}, {"t": torch.zeros(1, 4, 16)}))
    with pytest.raises(UserInputError, match=r"\(B, N, C\)"):
        loss(features({"s": torch.zeros(1, 8, 2, 2)}, {"t": torch.zeros(1, 8, 2, 2)}))


# --- registry and weighted total ------------------------------------------------------------


def test_weighted_total_by_hand():
    terms = {"task": torch.tensor(2.0), "output_kd": torch.tensor(3.0), "extra": torch.tensor(5.0)}
    losses = [TaskLoss(weight=1.0), OutputKDLoss(weight=0.5)]
    assert weighted_total(terms, losses).item() == pytest.approx(3.5)  # "extra" adds nothing


def test_weighted_total_rejects_a_loss_without_its_term():
    with pytest.raises(KeyError, match="similarity"):
        weighted_total(
            {"task": torch.tensor(1.0)},
            [TaskLoss(), SimilarityMatchingLoss(layer_pairs=[("a", "a")])],
        )


def test_loss_blocks_build_only_weighted_losses_with_their_own_options(tiny_teacher):
    from students import build_student

    student, _ = build_student(tiny_teacher, "base")
    blocks = validate_loss_blocks(
        {
            "task": {"weight": 1.0},
            "output_kd": {"weight": 0.0},
            "similarity": {"weight": 0.5, "max_positions": 64},
            "attention_relation": {"weight": 0.1, "relation_heads": 4},
        }
    )
    losses = build_losses(blocks, student.config, tiny_teacher.config)
    assert [type(loss) for loss in losses] == [
        TaskLoss,
        SimilarityMatchingLoss,
        AttentionRelationLoss,
    ]
    assert [loss.weight for loss in losses] == [1.0, 0.5, 0.1]
    # One loss's option stays its own: the attention loss keeps its default pooling.
    assert losses[1].max_positions == 64
    assert (losses[2].relation_heads, losses[2].max_positions) == (4, 256)
    # Default pairs follow each loss: stage outputs for similarity, projections for relations.
    assert ("mid_block", "mid_block") in losses[1].layer_pairs
    assert all(
        s.endswith(".attn1.to_q") or s.endswith(".attn1.to_k") or s.endswith(".attn1.to_v")
        for s, _ in losses[2].layer_pairs
    )
    assert set(LOSSES) == {"task", "output_kd", "feature_kd", "similarity", "attention_relation"}


@pytest.mark.parametrize(
    ("blocks", "error", "message"),
    [
        ({"feature": {}}, ValueError, "'feature'.*valid losses: task, output_kd"),
        ({"similarity": {"max_position": 64}}, ValidationError, "max_position"),
        ({"task": {"weight": -1.0}}, ValidationError, "greater than or equal to 0"),
        ({"task": {"weight": 0.0}}, ValueError, "every loss weight is zero"),
        ({"similarity": {"max_positions": 0}}, ValidationError, "greater than 0"),
        ({"attention_relation": {"relation_heads": "four"}}, ValidationError, "valid integer"),
    ],
)
def test_bad_loss_blocks_are_refused(blocks, error, message):
    with pytest.raises(error, match=message):
        validate_loss_blocks(blocks)


def test_which_blocks_need_a_teacher():
    assert not reads_teacher(validate_loss_blocks({"task": {}, "output_kd": {"weight": 0.0}}))
    assert reads_teacher(validate_loss_blocks({"task": {}, "output_kd": {}}))
