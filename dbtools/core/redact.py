"""Keeping secrets (Hub tokens, API keys) out of everything the toolkit writes or shows.

Every writer of settings uses these: `args.json`, the LoRA files' metadata, the trackers'
config and PNG settings (`public_settings`), `progress.json` and error messages
(`mask_secret_text`), and the training command shown in the notebook (`mask_secrets`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "<redacted>"
SECRET_FLAGS = ("hub_token",)
"""The secret flags the training command knows by name."""

_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|passwd|api_?key|auth)$", re.I)
# A flag whose name holds one of these words as a whole part (`--hub_token`, `--token_x`),
# but not `--keep_tokens` or `--tokenizer_name`.
_SECRET_FLAG = re.compile(r"(^|_)(token|secret|password|passwd|api_?key|auth)(_|$)", re.I)
_SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|api_[A-Za-z0-9]{20,})\b")


def mask_secret_text(text: str) -> str:
    """`text` with token-looking strings (`hf_...`) replaced by `<redacted>`."""
    return _SECRET_VALUE.sub(REDACTED, text)


def public_settings(settings: Mapping[str, Any] | Any) -> dict:
    """`settings` (a dict or a dataclass such as `TrainConfig`) as a dict without secrets:
    no secret-named keys (`hub_token`, `*_token`, `password`, ...), and token-looking
    strings in values replaced by `<redacted>`."""
    items = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
    return {key: mask_secret_text(value) if isinstance(value, str) else value
            for key, value in items.items() if not _SECRET_KEY.search(key)}


def is_secret_flag(name: str) -> bool:
    """True for a flag name that carries a secret (`hub_token`, `*_token`, ...)."""
    # A prefix of a secret flag is masked too: old parsers accepted abbreviations.
    return bool(_SECRET_FLAG.search(name)) or any(len(name) >= 3 and s.startswith(name) for s in SECRET_FLAGS)


def mask_secrets(argv: Iterable[str]) -> list[str]:
    """A command line safe to show or log: values of token-like flags (`--hub_token x`,
    `--hub_token=x`, any `--*_token`) and token-looking strings anywhere become `<redacted>`."""
    out: list[str] = []
    hide_next = False
    for arg in map(str, argv):
        if hide_next and not arg.startswith("--"):
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        if arg.startswith("--"):
            name, eq, _ = arg[2:].partition("=")
            if is_secret_flag(name):
                out.append(f"--{name}={REDACTED}" if eq else arg)
                hide_next = not eq
                continue
        out.append(mask_secret_text(arg))
    return out
