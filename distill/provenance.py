"""What each stage of a run was trained from, so a resume can tell when it changed.

`RUN/provenance.json` records, per stage, the fingerprint of the teacher pipeline whose UNet,
VAE and text encoder the stage used (`core.fingerprints`) and the key of the latent cache it
trained on (which covers the dataset, the encoders' weights and the preprocessing). A resume in the
middle of a stage compares both with what is there now: a teacher retrained at the same path, or
an edited dataset, would otherwise be mixed silently into a half-trained student. The run stops
with one line naming what changed, unless the stage is restarted (`--restart-stage`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.atomic import write_text_atomic
from core.errors import UserInputError
from core.fingerprints import folder_fingerprint, short

PROVENANCE_FILE = "provenance.json"


def teacher_fingerprint(source: str) -> str | None:
    """The fingerprint of a teacher given as a local folder or a hub id (its local snapshot);
    None when a hub model is not in the local hub cache (then nothing can be compared)."""
    if Path(source).is_dir():
        return folder_fingerprint(source)
    try:
        from huggingface_hub import snapshot_download

        return folder_fingerprint(snapshot_download(source, local_files_only=True))
    except Exception:  # not cached, offline, gated: there is no local copy to hash
        return None


class RunProvenance:
    """The stage records of one run folder (read and written by the main process)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / PROVENANCE_FILE
        try:
            self.stages: dict[str, dict[str, Any]] = json.loads(self.path.read_text())["stages"]
        except (OSError, json.JSONDecodeError, KeyError):
            self.stages = {}

    def record(self, stage: int, **facts: Any) -> None:
        """Set facts of a stage (teacher, teacher_fingerprint, cache_key) and save atomically."""
        self.stages[str(stage)] = self.stages.get(str(stage), {}) | facts
        write_text_atomic(
            self.path, json.dumps({"stages": self.stages}, indent=2, sort_keys=True) + "\n"
        )

    def check(self, stage: int, name: str, **facts: Any) -> None:
        """Refuse to resume stage `stage` when a recorded fact differs from `facts`."""
        recorded = self.stages.get(str(stage), {})
        for key, value in facts.items():
            before = recorded.get(key)
            if before is not None and value is not None and before != value:
                raise UserInputError(
                    f"stage {stage + 1} ({name}) cannot resume: its {key.replace('_', ' ')} "
                    f"changed since it started ({short(str(before))} -> {short(str(value))}); "
                    "pass --restart-stage to train this stage again from its start with it, or "
                    "--overwrite to start the run afresh"
                )
