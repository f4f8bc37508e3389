"""Prompt encodings on disk under `--cache_dir`, for a family whose text encoders only fill
the prompt cache (`ModelFamily.encoders_only_fill_the_cache`): a restarted run that finds
every prompt it needs there never loads its text encoders.

Keyed on content, like the latent cache: the text encoders' and tokenizers' files
(fingerprints), the model and tokenizer names, the dtype, the prompt length and the prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

from dbtools.core.atomic import atomic_write
from dbtools.train.data import file_fingerprint

logger = logging.getLogger(__name__)

TRAINING = "training"
"""Prompts as the training step reads them (`encoder.cache`)."""
PIPELINE = "pipeline"
"""Prompts as the family's pipeline encodes them for samples (`encoder.for_pipeline`)."""


class PromptStore:
    """One file per prompt and kind: `<folder>/<2 hex>/<sha256>.safetensors` holding the
    encoder's tensors for it, in order."""

    def __init__(self, folder: str | Path, key: str):
        self.folder, self.key = Path(folder), key

    def path(self, kind: str, prompt: str) -> Path:
        name = hashlib.sha256(json.dumps([self.key, kind, prompt]).encode()).hexdigest()
        return self.folder / name[:2] / f"{name}.safetensors"

    def holds(self, kind: str, prompts: Iterable[str]) -> bool:
        return all(self.path(kind, p).is_file() for p in prompts)

    def load(self, kind: str, prompts: Iterable[str]) -> dict[str, tuple]:
        """The stored encodings of `prompts` (an unreadable file is left out: encoded again)."""
        from safetensors.torch import load_file

        out = {}
        for prompt in prompts:
            path = self.path(kind, prompt)
            if not path.is_file():
                continue
            try:
                tensors = load_file(str(path))
            except Exception:  # a damaged cache file is encoded again, never trusted
                logger.warning("prompt cache file %s is unreadable; encoding again", path)
                continue
            out[prompt] = tuple(tensors[str(i)] for i in range(len(tensors)))
        return out

    def save(self, kind: str, entries: Mapping[str, tuple]) -> int:
        """Write the entries not stored yet; returns how many were written."""
        from safetensors.torch import save_file

        written = 0
        for prompt, tensors in entries.items():
            path = self.path(kind, prompt)
            if not path.is_file():
                data = {str(i): t.contiguous() for i, t in enumerate(tensors)}
                atomic_write(path, lambda tmp, data=data: save_file(data, tmp))
                written += 1
        return written


def store_key(files: Iterable[str | Path], *facts) -> str:
    """The key of a model's prompt encodings: its encoders' and tokenizers' files
    (`data.file_fingerprint`) and `facts` (names, dtype, prompt length)."""
    parts = [[file_fingerprint(f) for f in sorted(map(str, files))], [str(f) for f in facts]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
