"""A long run's learning curve: the task's metrics every N fine-tuning steps, one JSON line per point.

Points are keyed by (stage, step): a run resumed from an earlier save replays the same batches and reaches the same
point again, and that point is not written twice. Each line is written with one append, so a reader never sees
half a point.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from jpq_core.errors import JPQError


class LearningCurve:
    def __init__(self, path, every: int = 2500):
        if every < 1:
            raise JPQError(f"the curve's interval must be at least one step, not {every}.")
        self.path, self.every = Path(path), every

    def points(self) -> list[dict]:
        """The points written so far (lines that do not parse, e.g. from another program, are skipped)."""
        if not self.path.exists():
            return []
        points = []
        for line in self.path.read_text().splitlines():
            try:
                points.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return points

    def due(self, stage_step: int) -> bool:
        return stage_step % self.every == 0

    def record(self, net, task, stage: int, stage_step: int, step: int, quantized: bool) -> dict | None:
        """Evaluate a copy of `net` on the CPU (the run's own network keeps its device and mode) and append it."""
        if any(p.get("stage") == stage and p.get("stage_step") == stage_step for p in self.points()):
            return None
        metrics = task.evaluate(copy.deepcopy(net).cpu().eval())
        point = {"step": step, "stage": stage, "stage_step": stage_step, "quantized": quantized, "metrics": metrics}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(point) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return point
