"""`distill run` with a slow cache build and a short process-group timeout (a test helper).

    accelerate launch --multi_gpu --num_processes 2 slow_cache_run.py RECIPE SLEEP PG_TIMEOUT

Each VAE call of process 0's part of the cache build sleeps SLEEP seconds, so the build outlasts
the process group's PG_TIMEOUT seconds: it must still finish, because no process waits for the
build in a collective (they poll the cache folder, up to data.cache_timeout_hours).
"""

import os
import sys
import time
from datetime import timedelta

from accelerate import Accelerator, InitProcessGroupKwargs

import distill.data.build as build
from cli import EXIT_BAD_INPUT
from core.errors import UserInputError
from distill.recipe import load_recipe
from distill.trainer import DistillationTrainer

recipe_path, sleep, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
encode = build.encode_latent_distribution


def slow_encode(vae, pixels):
    if os.environ.get("RANK") == "0":  # torchrun's global rank
        time.sleep(sleep)
    return encode(vae, pixels)


build.encode_latent_distribution = slow_encode
recipe = load_recipe(recipe_path)
accelerator = Accelerator(
    kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout))]
)
try:
    DistillationTrainer(recipe, accelerator=accelerator, progress=False).train()
except UserInputError as error:
    print(f"distill run: error: {error}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
