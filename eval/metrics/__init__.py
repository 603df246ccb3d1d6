"""The evaluation's metrics behind one interface (`base.Metric`), and their registry.

base             Metric, Need, Column, Row, EvalContext, EvalOptions, Features
features         one Inception pass per row: pool3 and the classifier head's logits
fid              FID against the reference, and each student row minus the teacher
fidelity         FID of a student row against the teacher's images
clip             CLIP score, mean cosine and torchmetrics' ×100
inception_score  IS from the feature pass's logits
cost             params, GFLOPs, UNet evaluations, latency
registry         which metrics run, in report order; `register_metric`
"""
