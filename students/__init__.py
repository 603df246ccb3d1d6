"""Student UNets: variants as data, the teacher-to-student init map, and the builder."""

from students.builder import InitReport, build_student
from students.cost import count_params, forward_gflops, transformer_depths
from students.init_map import (
    PAIR_PRESETS,
    block_pairs,
    deepest_self_attention_pairs,
    init_map,
    layer_index_map,
    self_attention_pairs,
)
from students.variants import VARIANTS, StudentVariant, get_variant, student_config

__all__ = [
    "PAIR_PRESETS",
    "deepest_self_attention_pairs",
    "VARIANTS",
    "InitReport",
    "StudentVariant",
    "block_pairs",
    "build_student",
    "count_params",
    "forward_gflops",
    "get_variant",
    "init_map",
    "layer_index_map",
    "self_attention_pairs",
    "student_config",
    "transformer_depths",
]
