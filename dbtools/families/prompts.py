"""Prompts -> text-encoder hidden states for training, padded as in Shivam's script."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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


class PromptEncoder:
    """Tokenizes and encodes prompts; the text encoder is handed in at each call.

    Prompts are tokenized to the max length; without `pad_tokens` a batch is cut to its
    longest prompt. CLIP's attention is causal, so the states of the first n tokens do
    not depend on what follows: cutting cached max-length states gives exactly what
    encoding the shorter batch would. With `cache=True` (frozen text encoder) states are
    kept per prompt; once `grow` is False, prompts not yet cached are encoded every time
    and never kept.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, pad_tokens: bool, max_length: int | None,
                 use_attention_mask: bool, cache: bool, max_cached: int = 20_000):
        self.tokenizer = tokenizer
        self.pad_tokens, self.use_mask = pad_tokens, use_attention_mask
        self.max_length = max_length or tokenizer.model_max_length
        self.cache: dict[str, tuple] | None = {} if cache else None  # prompt -> (states, tokens)
        self.max_cached = max_cached
        self.grow = True

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return out.input_ids, out.attention_mask

    def encode(self, prompts: list[str], text_encoder: PreTrainedModel, device) -> torch.Tensor:
        """Hidden states `(len(prompts), L, D)` on `device` (with grad if the encoder trains)."""
        if self.cache is None:
            ids, mask = self.tokenize(prompts)
            length = ids.shape[1] if self.pad_tokens else int(mask.sum(1).max())
            return self._forward(text_encoder, ids[:, :length], mask[:, :length], device)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        fresh = {}
        if missing:
            ids, mask = self.tokenize(missing)
            with torch.no_grad():
                states = self._forward(text_encoder, ids, mask, device)
            fresh = {p: (s, int(n)) for p, s, n in zip(missing, states, mask.sum(1), strict=True)}
            for p in missing:
                if self.grow and len(self.cache) < self.max_cached:
                    self.cache[p] = fresh[p]
        entries = [self.cache.get(p) or fresh[p] for p in prompts]
        length = self.max_length if self.pad_tokens else max(n for _, n in entries)
        return torch.stack([s for s, _ in entries])[:, :length]

    def _forward(self, text_encoder, ids, mask, device) -> torch.Tensor:
        """Run the encoder where it is (it may be parked on the CPU); states go to `device`."""
        where = next(text_encoder.parameters()).device
        out = text_encoder(ids.to(where), attention_mask=mask.to(where) if self.use_mask else None)[0]
        return out.to(device)


class SDXLPromptEncoder:
    """SDXL prompts -> (both encoders' penultimate hidden states side by side, the second
    encoder's pooled projection), exactly as diffusers' SDXL pipeline encodes them
    (`families.encode_prompt_sdxl`); prompts are always padded to 77 tokens.

    With `cache=True` (frozen text encoders) both tensors are kept per prompt, under the
    same `grow` rule as `PromptEncoder`: once False, new prompts are encoded and not kept.
    """

    def __init__(self, tokenizers: list[PreTrainedTokenizerBase], *, cache: bool, max_cached: int = 20_000):
        self.tokenizers = list(tokenizers)
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None
        self.max_cached = max_cached
        self.grow = True

    def encode(self, prompts: list[str], text_encoders: list[PreTrainedModel],
               device) -> tuple[torch.Tensor, torch.Tensor]:
        """`(states (N, 77, D1 + D2), pooled (N, P))` on `device` (with grad if the encoders train)."""
        if self.cache is None:
            return self._forward(prompts, text_encoders, device)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        fresh = {}
        if missing:
            with torch.no_grad():
                states, pooled = self._forward(missing, text_encoders, device)
            fresh = dict(zip(missing, zip(states, pooled, strict=True), strict=True))
            for p in missing:
                if self.grow and len(self.cache) < self.max_cached:
                    self.cache[p] = fresh[p]
        entries = [self.cache[p] if p in self.cache else fresh[p] for p in prompts]
        return torch.stack([s for s, _ in entries]), torch.stack([q for _, q in entries])

    def _forward(self, prompts, text_encoders, device) -> tuple[torch.Tensor, torch.Tensor]:
        from dbtools.families.detect import encode_prompt_sdxl, tokenize_sdxl

        states, pooled = encode_prompt_sdxl(text_encoders, tokenize_sdxl(self.tokenizers, prompts))
        return states.to(device), pooled.to(device)
