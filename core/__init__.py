"""The base layer under `students`, `distill`, `eval` and `offline`: errors, cache paths, atomic
writes, fingerprints, and the model families (how each kind of Stable Diffusion teacher is
resolved, conditioned and assembled). It imports none of the packages above it."""
