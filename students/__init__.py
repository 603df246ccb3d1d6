"""Student UNets: variants as data, the teacher-to-student init map, and the builder."""

from students.builder import InitReport, build_student
from students.cost import count_params, forward_gflops
from students.init_map import block_pairs, init_map, layer_index_map, self_attention_pairs
from students.teachers import builtin_teachers, load_teacher_unet
from students.variants import VARIANTS, StudentVariant, get_variant, student_config

__all__ = [
    "VARIANTS",
    "InitReport",
    "StudentVariant",
    "block_pairs",
    "build_student",
    "builtin_teachers",
    "count_params",
    "forward_gflops",
    "get_variant",
    "init_map",
    "layer_index_map",
    "load_teacher_unet",
    "self_attention_pairs",
    "student_config",
]
