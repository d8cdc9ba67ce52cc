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


_LINE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (120, 120, 120)]


def plot_series(path: Path, panels: dict[str, dict[str, list[tuple[int, float | None]]]], width: int = 360,
                height: int = 220) -> None:
    """A PNG with one line chart per panel: `panels[title][label] = [(step, value), ...]` (None: no point).

    Drawn with PIL (no plotting library needed); a "teacher" series is drawn grey.
    """
    from PIL import Image, ImageDraw

    margin, legend = 36, 14
    canvas = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(canvas)
    for p, (title, series) in enumerate(panels.items()):
        x0 = p * width
        points = [(s, v) for line in series.values() for s, v in line if v is not None]
        if not points:
            continue
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        s_lo, s_hi = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
        v_lo, v_hi = min(values), max(values)
        if v_hi - v_lo < 1e-9:
            v_lo, v_hi = v_lo - 0.5, v_hi + 0.5

        def xy(s, v):
            return (x0 + margin + (s - s_lo) / (s_hi - s_lo) * (width - 2 * margin),
                    height - margin - (v - v_lo) / (v_hi - v_lo) * (height - 2 * margin - legend))

        draw.rectangle([x0 + margin, legend + 4, x0 + width - margin, height - margin], outline=(180, 180, 180))
        draw.text((x0 + margin, 2), title, fill="black")
        draw.text((x0 + 2, legend + 4), f"{v_hi:.3g}", fill="black")
        draw.text((x0 + 2, height - margin - 10), f"{v_lo:.3g}", fill="black")
        draw.text((x0 + margin, height - margin + 4), f"step {s_lo}", fill="black")
        draw.text((x0 + width - margin - 60, height - margin + 4), f"{s_hi}", fill="black")
        for i, (label, line) in enumerate(series.items()):
            colour = (150, 150, 150) if label == "teacher" else _LINE_COLOURS[i % len(_LINE_COLOURS)]
            pts = [xy(s, v) for s, v in line if v is not None]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for x, y in pts:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            draw.text((x0 + margin + 4 + 64 * i, height - 16), label, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
