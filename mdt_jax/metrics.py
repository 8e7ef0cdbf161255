"""Metric logging at the edges: JSONL (one object per line) plus TensorBoard event files."""
from __future__ import annotations

import json
import os


class MetricWriter:
    """Appends `{"step": s, **metrics}` to `workdir/metrics.jsonl` and scalars to `workdir/tb`.

    `truncate_after` drops JSONL records past that step (a resumed run rewrites them).
    """

    def __init__(self, workdir: str, truncate_after: int | None = None, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        if truncate_after is not None and os.path.exists(self.path):
            keep = []
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= truncate_after:
                            keep.append(line)
                    except (json.JSONDecodeError, KeyError, TypeError):
                        break  # a torn last line from a killed run
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict) -> None:
        self._f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
