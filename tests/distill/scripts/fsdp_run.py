"""`distill run` with the student sharded by FSDP2 on CPU processes (a test helper).

    torchrun --nproc_per_node 2 fsdp_run.py RECIPE[:STOP_AFTER_STEPS] ...

Each argument is one `distill run` (stopped after that many steps when given), one after the
other in the same processes: `whole.yaml parts.yaml:2 parts.yaml` trains a run through, and
another interrupted after 2 steps and resumed.

accelerate 1.15 turns FSDP on only for accelerators (its MULTI_CPU path ignores the plugin),
while torch's FSDP2 (`fully_shard`) runs on CPU with gloo. So this sets the distributed type and
plugin the way accelerate does on GPUs, and everything after that (prepare, clipping, the state
dicts) is accelerate's and torch's FSDP2 code.
"""

import sys

from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

from distill.recipe import load_recipe
from distill.trainer import DistillationTrainer


def fsdp_accelerator() -> Accelerator:
    # A fresh AcceleratorState per run (accelerate keeps per-run preparation state in it), over
    # the same process group (PartialState is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=True)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    return accelerator


def run(recipe_path: str, stop: int | None) -> None:
    accelerator = fsdp_accelerator()
    trainer = DistillationTrainer(
        load_recipe(recipe_path), accelerator=accelerator, progress=False, stop_after_steps=stop
    )
    build = trainer.stages.build

    def build_and_report(index, checkpoint):
        stage = build(index, checkpoint)
        parameters = list(stage.model.parameters())
        shadows = stage.ema.shadow_params if stage.ema is not None else []
        sharded = all(isinstance(p, DTensor) for p in parameters + shadows)
        print(f"rank {accelerator.process_index}: student and EMA sharded: {sharded}", flush=True)
        return stage

    trainer.stages.build = build_and_report
    trainer.train()


for argument in sys.argv[1:]:
    path, _, stop = argument.partition(":")
    run(path, int(stop) if stop else None)
