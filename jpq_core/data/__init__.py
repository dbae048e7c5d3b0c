"""Data: synthetic and real stereo pairs, classification sets."""

from __future__ import annotations

SYNTHETIC_VALIDATION_SCENES = 8


def stereo_eval_samples(name: str) -> list:
    """The named stereo evaluation set: "middlebury" (one real pair) or "synthetic" (validation scenes)."""
    from jpq_core.data.stereo_files import middlebury_motorcycle
    from jpq_core.data.synthetic_stereo import make_scene, scene_seed
    from jpq_core.errors import JPQError

    if name == "middlebury":
        return [middlebury_motorcycle()]
    if name == "synthetic":
        return [make_scene(scene_seed("validation", i), 256, 512) for i in range(SYNTHETIC_VALIDATION_SCENES)]
    raise JPQError(f"unknown stereo data {name!r}; use middlebury, synthetic, or --left/--right for your own pair.")
