"""The umT5 prompt tokenizer: prompt cleaning plus a local `tokenizer.json`, read offline.

Owns `HuggingfaceTokenizer` (upstream name kept for user scripts) and the cleaning helpers
`basic_clean`, `whitespace_clean`, `canonicalize`. The tokenizer is loaded with the `tokenizers`
library from `<folder>/tokenizer.json` (what transformers' fast T5 tokenizer reads too), so neither
transformers nor the network is needed. The `tokenizer.json` itself carries the T5 behaviour:
`</s>` appended by its post-processor, literal special-token strings matched before normalisation.
"""

from __future__ import annotations

import html
import os
import string
from pathlib import Path

import ftfy
import regex as re
import torch

from wan.checkpoint import CheckpointError

__all__ = ["HuggingfaceTokenizer", "basic_clean", "whitespace_clean", "canonicalize"]

TOKENIZER_FILE = "tokenizer.json"
CLEAN_MODES = (None, "whitespace", "lower", "canonicalize")


def basic_clean(text: str) -> str:
    # ftfy first (mojibake, quotes, width, entities when no '<' precedes them), then two rounds of
    # html.unescape for the entities ftfy left alone or that were escaped twice.
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    # `regex`'s \s covers all Unicode whitespace (no-break space, ideographic space, ...).
    return re.sub(r"\s+", " ", text).strip()


def canonicalize(text: str, keep_punctuation_exact_string: str | None = None) -> str:
    """Lower-case, ASCII punctuation removed (except an exact string to keep), whitespace collapsed."""
    text = text.replace("_", " ")
    drop_punctuation = str.maketrans("", "", string.punctuation)
    if keep_punctuation_exact_string:
        text = keep_punctuation_exact_string.join(
            part.translate(drop_punctuation) for part in text.split(keep_punctuation_exact_string)
        )
    else:
        text = text.translate(drop_punctuation)
    text = text.lower()
    text = re.sub(r"\s+", " ", text)
    return text.strip()


def _tokenizer_file(name: str | os.PathLike) -> Path:
    """`name` is a tokenizer folder (or a tokenizer.json path); return the json file or explain."""
    path = Path(name)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(
            f"tokenizer folder not found: {path}. Pass the local folder holding {TOKENIZER_FILE} "
            "(in a Wan release: <checkpoint_dir>/google/umt5-xxl); nothing is downloaded."
        )
    file = path / TOKENIZER_FILE
    if not file.is_file():
        present = sorted(p.name for p in path.iterdir())[:10]
        raise CheckpointError(
            f"tokenizer file not found: {file} (the folder holds {present}). The fast-tokenizer "
            f"{TOKENIZER_FILE} is required; copy it from the release's google/umt5-xxl folder."
        )
    return file


class HuggingfaceTokenizer:
    """Clean prompts, tokenize with `</s>`, truncate/pad to `seq_len`, return LongTensor ids (+ mask).

    name: local folder with `tokenizer.json` (or the file itself).
    seq_len: fixed output length (truncation keeps `</s>` last, padding with id 0); None pads a batch
        to its longest prompt and never truncates.
    clean: None, 'whitespace' (what the pipeline uses), 'lower' or 'canonicalize'.
    """

    def __init__(self, name, seq_len: int | None = None, clean: str | None = None, **kwargs):
        from tokenizers import Tokenizer

        if kwargs:
            raise TypeError(
                f"HuggingfaceTokenizer got unsupported options {sorted(kwargs)}: the tokenizer is read "
                f"offline from {TOKENIZER_FILE} with the `tokenizers` library (no transformers options)"
            )
        if clean not in CLEAN_MODES:
            raise ValueError(f"clean must be one of {CLEAN_MODES}, got {clean!r}")
        if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 1):
            raise ValueError(f"seq_len must be a positive int or None, got {seq_len!r}")
        self.name = name
        self.seq_len = seq_len
        self.clean = clean

        file = _tokenizer_file(name)
        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception
            raise CheckpointError(f"could not read tokenizer {file}: {exc}") from exc

        self.pad_id = self._require_token("<pad>", file)
        self.eos_id = self._require_token("</s>", file)
        self._fixed_length()
        # Same meaning as transformers' fast tokenizers: vocab_size without added tokens, len() with.
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=False)

    def _require_token(self, token: str, file: Path) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"tokenizer {file} has no {token} token; is it a T5 tokenizer?")
        return token_id

    def _fixed_length(self) -> None:
        # Truncation here subtracts the post-processor's appended </s>, so at most seq_len - 1
        # content tokens survive and </s> stays last, as transformers' truncation=True does.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        if self.seq_len is not None:
            self.tokenizer.enable_truncation(max_length=self.seq_len)
            self.tokenizer.enable_padding(length=self.seq_len, pad_id=self.pad_id, pad_token="<pad>")
        else:
            self.tokenizer.enable_padding(pad_id=self.pad_id, pad_token="<pad>")

    def count_tokens(self, sequence: list[str]) -> list[int]:
        """Tokens of each prompt (cleaned, `</s>` included) before truncation: a count above seq_len
        means `__call__` keeps only the first seq_len - 1 tokens and `</s>`."""
        texts = [self._clean(s) for s in sequence]
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        try:
            return [len(e.ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        finally:
            self._fixed_length()

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _clean(self, text: str) -> str:
        if self.clean == "whitespace":
            return whitespace_clean(basic_clean(text))
        if self.clean == "lower":
            return whitespace_clean(basic_clean(text)).lower()
        if self.clean == "canonicalize":
            return canonicalize(basic_clean(text))
        return text

    def __call__(self, sequence: str | list[str], return_mask: bool = False, add_special_tokens: bool = True):
        """ids [B, seq_len] int64, or (ids, mask) with mask 1 on real tokens (</s> included)."""
        if isinstance(sequence, str):
            sequence = [sequence]
        if not isinstance(sequence, (list, tuple)) or not all(isinstance(s, str) for s in sequence):
            raise TypeError(f"expected a prompt string or a list of strings, got {type(sequence).__name__}")
        if not sequence:
            raise ValueError("no prompts given: pass a string or a non-empty list of strings")
        texts = [self._clean(s) for s in sequence]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)  # [B, seq_len]
        if not return_mask:
            return ids
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)  # [B, seq_len]
        return ids, mask
