"""Reward stage: feature extractors, diversity metrics, realism scorer, the frozen artifact."""
from __future__ import annotations


def load(path, *, expect_extractor: str | None = None, device="cpu"):
    """Load a reward artifact directory (or a run directory holding `reward/`) as a callable model:
    `rewards, components = reward.load(path)(images)`. See `reward.artifact.load_artifact`."""
    from reward.artifact import load_artifact
    return load_artifact(path, expect_extractor=expect_extractor, device=device)
