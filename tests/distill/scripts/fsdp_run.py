"""`distill run` with the student sharded by FSDP2 on CPU processes (a test helper).

    torchrun --nproc_per_node 2 fsdp_run.py RECIPE [STOP_AFTER_STEPS]

accelerate 1.15 turns FSDP on only for accelerators (its MULTI_CPU path ignores the plugin),
while torch's FSDP2 (`fully_shard`) runs on CPU with gloo. So this sets the distributed type and
plugin the way accelerate does on GPUs, and everything after that (prepare, clipping, the state
dicts) is accelerate's and torch's FSDP2 code.
"""

import sys

from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

from distill.recipe import load_recipe
from distill.trainer import DistillationTrainer

recipe = load_recipe(sys.argv[1])
stop = int(sys.argv[2]) if len(sys.argv) > 2 else None
accelerator = Accelerator(cpu=True)
accelerator.state.distributed_type = DistributedType.FSDP
accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)

trainer = DistillationTrainer(
    recipe, accelerator=accelerator, progress=False, stop_after_steps=stop
)
build = trainer.stages.build


def build_and_report(index, checkpoint):
    context = build(index, checkpoint)
    parameters = list(context.student.parameters())
    shadows = context.ema.shadow_params if context.ema is not None else []
    sharded = all(isinstance(p, DTensor) for p in parameters + shadows)
    print(f"rank {accelerator.process_index}: student and EMA sharded: {sharded}", flush=True)
    return context


trainer.stages.build = build_and_report
trainer.train()
