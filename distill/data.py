"""Training data: prompt files, the per-prompt text-embedding cache, image folders and padded text.

The umT5 encoder is 5.7B parameters, so every prompt is encoded once, saved per prompt under
`cache_dir/text/<teacher id>/` (written atomically: temp file + rename), and the encoder is freed
before training. The x0 datasets (teacher samples or VAE-encoded images) are `distill.datastage`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """Bad training data (empty prompt file, unreadable image, missing caption...)."""


# A prompt file is read whole and each prompt's umT5 embedding is cached on disk (for the real
# teacher about 8 KB per token, so 1-2 MB per prompt): past these limits a file is almost surely
# not what was meant, and the cache would need terabytes.
MAX_PROMPT_FILE_BYTES = 100 * 2**20
MAX_PROMPTS = 1_000_000


def read_prompt_lines(path: str | os.PathLike, what: str = "prompt file", flag: str = "--data.prompts",
                      ) -> list[tuple[int, str]]:
    """(line number, prompt) of each non-empty line of a UTF-8 text file, stripped; a DataError
    that says what to do when the file is missing, empty, not UTF-8 text, or too large."""
    if not path:
        raise DataError(f"no {what} given: pass {flag} FILE (one prompt per line)")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} not found: {path}\npass an existing file to {flag} (one prompt per line)")
    if not path.is_file():
        raise DataError(f"{what} {path} is not a file\npass a text file to {flag} (one prompt per line)")
    size = path.stat().st_size
    if size > MAX_PROMPT_FILE_BYTES:
        raise DataError(f"{what} {path} is {size / 2**20:.0f} MB, over the limit of "
                        f"{MAX_PROMPT_FILE_BYTES // 2**20} MB\nsplit it and train on a part (each prompt's "
                        f"embedding is cached on disk); at most {MAX_PROMPTS:,} prompts per file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a BOM (Windows editors) is not part of the first prompt
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{what} {path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}, "
                        f"column {column}\nsave it as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)") from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise DataError(f"{what} {path} holds a NUL byte at line {line}: it is not a text file\n"
                        f"pass a text file to {flag} (one prompt per line)")
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"{what} {path} holds no prompts\nwrite one prompt per line")
    if len(lines) > MAX_PROMPTS:
        raise DataError(f"{what} {path} holds {len(lines):,} prompts, over the limit of {MAX_PROMPTS:,}\n"
                        "split it and train on a part (each prompt's embedding is cached on disk)")
    return lines


def load_prompts(path: str | os.PathLike, what: str = "prompt file", flag: str = "--data.prompts") -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file; a clear error if there are none (`read_prompt_lines`)."""
    return [prompt for _, prompt in read_prompt_lines(path, what, flag)]


def _digest(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a corrupt cache entry is recomputed, not fatal
        log.warning("ignoring unreadable cache entry %s (%s); recomputing it", path, exc)
        return None


def file_identity(path: Path) -> list:
    """What changes when a checkpoint file changes: name, size, modification time."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, int(stat.st_mtime)]


class EmbeddingCache:
    """Per-prompt umT5 embeddings ([L, 4096], bf16 as the encoder returns them) on disk."""

    def __init__(self, cache_dir: str | os.PathLike, teacher_id: str):
        self.folder = Path(cache_dir) / "text" / teacher_id

    def path(self, prompt: str) -> Path:
        return self.folder / f"{_digest(prompt)[:20]}.safetensors"

    def missing(self, prompts: list[str]) -> list[str]:
        return sorted({p for p in prompts if not self.path(p).is_file()})

    def store(self, prompts: list[str], embeddings: list[torch.Tensor]) -> None:
        for prompt, emb in zip(prompts, embeddings):
            _atomic_save({"context": emb}, self.path(prompt), metadata={"prompt": prompt})

    def get(self, prompts: list[str]) -> list[torch.Tensor]:
        out = []
        for prompt in prompts:
            entry = _load(self.path(prompt))
            if entry is None:
                raise DataError(f"text embedding of {prompt!r} is not cached in {self.folder}")
            out.append(entry["context"])
        return out


def image_folder(path: str | os.PathLike) -> list[tuple[Path, str]]:
    """(image, caption) pairs: every image with a same-named .txt caption beside it."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    pairs = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise DataError(f"image {image} has no caption file {caption.name}: write its prompt there")
        try:
            text = caption.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as exc:
            raise DataError(f"caption {caption} is not UTF-8 text ({exc.reason} at byte {exc.start})\n"
                            "save it as UTF-8") from None
        if not text:
            raise DataError(f"caption {caption} is empty")
        pairs.append((image, text))
    if not pairs:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return pairs


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Resize (cover) + center-crop to size = (width, height); returns [3, 1, H, W] in [-1, 1]."""
    from PIL import Image

    try:
        image = Image.open(path).convert("RGB")
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"could not read image {path}: {exc}") from exc
    width, height = size
    scale = max(width / image.width, height / image.height)
    image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)  # [H, W, 3]
    return pixels.permute(2, 0, 1)[:, None]  # [3, 1, H, W]


def text_dtype(cfg, platform: str) -> torch.dtype:
    """The dtype training keeps text embeddings in on the device: bf16 when both the teacher (under
    bf16 autocast) and the student compute in bf16 (each would round them to bf16 anyway; the GPU
    umT5 emits bf16), else float32."""
    bf16 = (platform == "cuda" and cfg.teacher.device_strategy != "cpu" and cfg.teacher.dtype == "bfloat16"
            and cfg.student.dtype == "bfloat16")
    return torch.bfloat16 if bf16 else torch.float32


class DeviceText:
    """Per-prompt text embeddings kept on the training device, each padded once to `text_len` rows.

    `get(indices)` -> (text [b, text_len, D] on `device` in `dtype`, mask [b, text_len] bool on
    `device`, lengths [b]): one device-side stack per step, no host padding and no upload for a prompt
    seen recently. A prompt not held is read from `source` (index -> [L_i, D] CPU tensor, e.g.
    `EmbeddingLRU`), padded into page-locked memory and uploaded without blocking the host; the last
    `capacity` prompts stay (least recently used goes first). The student reads the padded rows with
    the mask, the teacher views `text[i, :lengths[i]]`: the same memory serves both.
    """

    def __init__(self, source, text_len: int, device: torch.device, dtype: torch.dtype, capacity: int):
        if capacity < 1:
            raise ValueError(f"the device text cache must hold at least one prompt; got capacity {capacity}")
        self.source, self.text_len, self.device, self.dtype = source, text_len, torch.device(device), dtype
        self.capacity = capacity
        self._rows: OrderedDict[int, tuple[torch.Tensor, int]] = OrderedDict()
        self._positions = torch.arange(text_len, device=self.device)  # [text_len]
        self.uploads = 0

    def _row(self, index: int) -> tuple[torch.Tensor, int]:
        if index in self._rows:
            self._rows.move_to_end(index)
            return self._rows[index]
        emb = self.source[index]
        n = min(emb.shape[0], self.text_len)
        pinned = self.device.type == "cuda"
        host = torch.zeros(self.text_len, emb.shape[-1], dtype=self.dtype, pin_memory=pinned)  # [text_len, D]
        host[:n] = emb[:n]
        row = host.to(self.device, non_blocking=True) if pinned else host.to(self.device)
        self.uploads += 1
        self._rows[index] = (row, n)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)
        return row, n

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        rows = [self._row(int(i)) for i in indices]
        text = torch.stack([row for row, _ in rows])  # [b, text_len, D], a device-side copy
        lengths = [n for _, n in rows]
        host_lengths = torch.tensor(lengths, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        mask = self._positions[None, :] < host_lengths.to(self.device, non_blocking=True)[:, None]  # [b, text_len]
        return text, mask, lengths


def pad_text(contexts: list[torch.Tensor], length: int) -> tuple[np.ndarray, np.ndarray]:
    """List of [L_i, D] -> padded float32 [B, length, D] and bool mask [B, length]."""
    dim = contexts[0].shape[-1]
    text = np.zeros((len(contexts), length, dim), np.float32)
    mask = np.zeros((len(contexts), length), bool)
    for i, c in enumerate(contexts):
        n = min(c.shape[0], length)
        text[i, :n] = c[:n].float().cpu().numpy()
        mask[i, :n] = True
    return text, mask
