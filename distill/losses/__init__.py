"""Distillation losses: small parameter-free modules returning named, unweighted terms.

Three call shapes, told apart by each class's `uses_teacher` / `uses_features` flags:
- TaskLoss()(student_pred, target)                               -> {"task": ...}
- OutputKDLoss()(student_pred, teacher_pred)                     -> {"output_kd": ...}
- FeatureKDLoss / SimilarityMatchingLoss / AttentionRelationLoss
      (student_feats, teacher_feats, pairs)                      -> {"<name>": ...}
where the feature dicts come from `distill.taps.FeatureTaps` and pairs are
(student_path, teacher_path) tuples. `weighted_total` turns the terms into the training loss.
"""

from distill.losses.attention_relation import (
    AttentionRelationLoss,
    attention_relation_log_probs,
    relation_kl,
)
from distill.losses.combine import (
    LOSSES,
    active_losses,
    build_losses,
    needs_feature_taps,
    needs_teacher,
    weighted_total,
)
from distill.losses.feature_kd import FeatureKDLoss, feature_pairs
from distill.losses.output_kd import OutputKDLoss
from distill.losses.similarity import (
    SimilarityMatchingLoss,
    pooled_grid_size,
    pooled_tokens,
    similarity_matrix,
)
from distill.losses.task import PREDICTION_TYPES, TaskLoss, task_target

__all__ = [
    "LOSSES",
    "PREDICTION_TYPES",
    "AttentionRelationLoss",
    "FeatureKDLoss",
    "OutputKDLoss",
    "SimilarityMatchingLoss",
    "TaskLoss",
    "active_losses",
    "attention_relation_log_probs",
    "build_losses",
    "feature_pairs",
    "needs_feature_taps",
    "needs_teacher",
    "pooled_grid_size",
    "pooled_tokens",
    "relation_kl",
    "similarity_matrix",
    "task_target",
    "weighted_total",
]
