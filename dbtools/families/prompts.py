"""Prompts and the text encoders: how many tokens a caption loses to the encoder's limit.

The prompt encoders themselves (Shivam's padding, the cache of frozen encoders' outputs)
belong to their families: `families.sd.PromptEncoder`, `families.sdxl.SDXLPromptEncoder`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dbtools.families.sd import PromptEncoder
from dbtools.families.sdxl import SDXLPromptEncoder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["PromptEncoder", "SDXLPromptEncoder", "truncation_note"]


def truncation_note(captions: dict[str, str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> str | None:
    """One line about the captions longer than the text encoder reads (`max_length` tokens,
    start and end tokens included), or None when none is: how many, by how much, and the
    longest one's source. `captions` maps each distinct caption to where it comes from."""
    lengths = {c: len(ids) for c, ids in zip(captions, tokenizer(list(captions), truncation=False).input_ids,
                                              strict=True)}
    over = {c: n - max_length for c, n in lengths.items() if n > max_length}
    if not over:
        return None
    longest = max(over, key=over.get)
    cut = sorted(over.values())
    by = f"{cut[0]} tokens" if len(cut) == 1 else \
        f"{cut[0]} to {cut[-1]} tokens, {sum(cut) / len(cut):.0f} on average"
    return (f"captions: {len(over)} of {len(captions)} are longer than the text encoder's {max_length} tokens and are "
            f"cut (by {by}): the words past the limit "
            f"never reach training. Shorten them; the longest is {captions[longest]} ({lengths[longest]} tokens).")
