"""Run outputs besides checkpoints: metrics as JSONL and TensorBoard events, PNG sample grids."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


class MetricsWriter:
    """Append-only `metrics.jsonl` plus TensorBoard scalars under `tb/` (rank 0 only)."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tb"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3), **{k: float(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in scalars.items():
            self._tb.add_scalar(key, float(value), int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def to_uint8(image) -> np.ndarray:
    """[3, H, W] in [-1, 1] (torch or numpy) -> [H, W, 3] uint8."""
    array = np.asarray(image.detach().float().cpu() if hasattr(image, "detach") else image, np.float32)
    return ((np.clip(array, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)


def save_grid(path: Path, rows: list[list[np.ndarray]], pad: int = 2) -> None:
    """A PNG grid of equally sized [H, W, 3] uint8 images, `rows[r][c]`."""
    from PIL import Image

    h, w, _ = rows[0][0].shape
    cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y : y + h, x : x + w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
