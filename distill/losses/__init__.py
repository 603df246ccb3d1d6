"""Distillation losses: modules that read one step's record (`StepOutputs`) and return named,
unweighted terms.

- `task`: MSE(student, scheduler target ε or v), optionally min-SNR-γ weighted
- `output_kd`: MSE(student, teacher prediction), the "soft labels"
- `feature_kd`: Σ MSE over layer pairs (BK-SDM)
- `similarity`: Σ MSE of position-similarity matrices over layer pairs (width-independent)
- `attention_relation`: Σ KL of self-attention relations over projection pairs (MiniLMv2)

Each has its own recipe block (`Options`); see `base.py` for the contract and `registry.py` for
how blocks become modules and terms become the training loss.
"""

from distill.losses.attention_relation import (
    AttentionRelationLoss,
    attention_relation_log_probs,
    relation_kl,
)
from distill.losses.base import (
    FeatureLoss,
    FeatureLossOptions,
    LayerPair,
    Loss,
    LossOptions,
    StepOutputs,
)
from distill.losses.feature_kd import FeatureKDLoss
from distill.losses.output_kd import OutputKDLoss
from distill.losses.registry import (
    LOSSES,
    active,
    build_losses,
    reads_teacher,
    register_loss,
    validate_loss_blocks,
    weighted_total,
)
from distill.losses.similarity import (
    SimilarityMatchingLoss,
    pooled_grid_size,
    pooled_positions,
    pooled_tokens,
    similarity_matrix,
)
from distill.losses.task import PREDICTION_TYPES, TaskLoss, min_snr_weights, task_target

__all__ = [
    "LOSSES",
    "PREDICTION_TYPES",
    "AttentionRelationLoss",
    "FeatureKDLoss",
    "FeatureLoss",
    "FeatureLossOptions",
    "LayerPair",
    "Loss",
    "LossOptions",
    "OutputKDLoss",
    "SimilarityMatchingLoss",
    "StepOutputs",
    "TaskLoss",
    "active",
    "attention_relation_log_probs",
    "build_losses",
    "pooled_grid_size",
    "pooled_positions",
    "pooled_tokens",
    "reads_teacher",
    "register_loss",
    "relation_kl",
    "min_snr_weights",
    "similarity_matrix",
    "task_target",
    "validate_loss_blocks",
    "weighted_total",
]
