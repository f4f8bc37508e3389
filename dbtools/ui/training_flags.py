"""The training cell's flag policy: the original notebook's flags, the model family's `auto`
values, the form's fields, the memory profile and the extra flags, in that order, and the
command they make. Pure apart from the family detection and GPU probe it is handed or asks."""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass, field
from typing import Any

from dbtools.core.env import (
    gpu_memory_gib,
)
from dbtools.core.errors import UserError
from dbtools.core.redact import mask_secrets
from dbtools.families.models import detect_family
from dbtools.families.profiles import (
    AUTO,
    MEMORY_PROFILES,
    SD_DEFAULT,
    USER_WINS,
    fit_warning,
    learning_rate_for,
    profile_note,
    recommended_profile,
)
from dbtools.ui.commands import build_train_command

logger = logging.getLogger(__name__)


# The original notebook's training flags: the starting point the training cell changes.
SEED_TRAIN_FLAGS: dict[str, Any] = dict(
    pretrained_vae_name_or_path="stabilityai/sd-vae-ft-mse", revision="fp16", with_prior_preservation=True,
    prior_loss_weight=1.0, seed=1337, resolution=512, train_batch_size=1, train_text_encoder=True,
    mixed_precision="fp16", use_8bit_adam=True, read_prompts_from_txts=True, gradient_accumulation_steps=1,
    learning_rate=1e-6, lr_scheduler="constant", lr_warmup_steps=0, num_class_images=200,
    sample_batch_size=4, save_interval=500,
)

def family_defaults(detected) -> dict[str, Any]:
    """The training cell's `auto` values for a detected family (`families.Detected`): the
    native resolution, the family's recommended VAE and its prior-preservation defaults
    (`ModelFamily.prior_defaults`; SDXL: fewer class images, made in smaller batches). SD 1.x
    gets exactly the original notebook's."""
    family = detected.family
    return dict(resolution=detected.resolution, pretrained_vae_name_or_path=family.recommended_vae,
                **family.prior_defaults)


def _is_auto(value: Any) -> bool:
    """A form value meaning "the model's own default": "auto" or a 0 size."""
    return (isinstance(value, str) and value.strip().lower() == AUTO) or (value == 0 and not isinstance(value, bool))


def parse_extra_flags(text: str) -> dict[str, Any]:
    """`"--snr_gamma=5 --hflip --n_save_sample 2"` -> `{"snr_gamma": "5", "hflip": True, ...}`."""
    tokens, flags = shlex.split(text), {}
    for i, token in enumerate(tokens):
        if not token.startswith("--"):
            if i == 0 or not tokens[i - 1].startswith("--") or "=" in tokens[i - 1]:
                raise UserError(f"extra_flags: {token!r} is not a --flag or the value of one.")
            continue
        name, eq, value = token[2:].partition("=")
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        flags[name] = value if eq else (nxt if nxt is not None and not nxt.startswith("--") else True)
    return flags


@dataclass
class TrainingFlags:
    """What the training cell runs with: the flags, notes to show, and a memory warning."""

    flags: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    warning: str | None = None
    family: Any = None


def training_flags(model: str, *, memory_profile: str = SD_DEFAULT, family=None, gpu_gib: float | None = None,
                   extra_flags: str = "", **flags: Any) -> TrainingFlags:
    """The training cell's flags, with the notes and the memory warning to show about them.

    Layers, later ones winning: the original notebook's flags, the family's defaults
    (`family_defaults`, when the family is known), the form's `flags`, the memory profile,
    then `extra_flags`. An empty form field leaves its flag out; `"auto"` (or 0 for a size or
    count) takes the family's default, `learning_rate="auto"` (or none) the profile's
    (`profiles.learning_rate_for`: LoRA's when the run trains LoRA), and `memory_profile="auto"`
    the `recommended_profile` for the family and `gpu_gib`. `family` (a `families.Detected`) is
    detected from `model` only when an `auto` value needs it. A profile's flags win over the form's fields (each change
    is noted). With a known family and `gpu_gib`, `warning` says when the run is estimated
    not to fit the GPU (`profiles.fit_warning`).
    """
    flags = {k: None if isinstance(v, str) and not v.strip() else v for k, v in flags.items()}
    autos = {k for k, v in flags.items() if _is_auto(v)}
    if family is None and (autos - {"learning_rate"} or memory_profile == AUTO):
        family = detect_family(model, revision=flags.get("revision") or SEED_TRAIN_FLAGS["revision"])
    notes: list[str] = []
    if memory_profile == AUTO:
        memory_profile = recommended_profile(family.family.key, gpu_gib)
        if memory_profile != SD_DEFAULT:  # SD 1.x/2.x keep the original notebook's settings: nothing to say
            notes.append(f"{family.family.label}: memory profile {memory_profile!r}.")
    if memory_profile not in MEMORY_PROFILES:
        raise UserError(f"memory_profile {memory_profile!r} is not one of: {', '.join(MEMORY_PROFILES)}, "
                        f"{AUTO!r}. Pick one of them in the training cell.")
    profile = {k: v for k, v in MEMORY_PROFILES[memory_profile].items() if k not in USER_WINS}
    form = {k: v for k, v in flags.items() if k not in autos}
    notes += [f"The memory profile {memory_profile!r} sets --{k}={v} (the form had {form[k]}); "
              f"put --{k} in extra_flags to change it." for k, v in profile.items()
              if form.get(k) is not None and form[k] != v]
    merged = {**SEED_TRAIN_FLAGS, **(family_defaults(family) if family is not None else {}), **form, **profile}
    merged.setdefault("checkpointing_steps", merged["save_interval"])
    merged.setdefault("checkpoints_total_limit", 1)
    extra = parse_extra_flags(extra_flags)
    if form.get("learning_rate") is None:  # `auto` or left out: the rate that suits the run
        merged["learning_rate"] = learning_rate_for(memory_profile, {**merged, **extra})
    merged.update(extra)
    result = TrainingFlags(merged, notes, family=family)
    if family is not None:
        notes += [n for n in [profile_note(memory_profile, family.family.key)] if n]
        result.warning = fit_warning(family.family.key, merged, gpu_gib, memory_profile)
    return result


def training_command(model: str, output_dir: str | os.PathLike, concepts_list: str | os.PathLike, *,
                     resume: bool = False, **options: Any) -> list[str]:
    """The training cell's `accelerate launch train_dreambooth.py` argv from `training_flags`
    (`options` are its arguments; its notes and warning are logged). Checkpoints follow
    `save_interval` (one kept) unless set; `resume` adds `--resume_from_checkpoint latest`."""
    chosen = training_flags(model, **options)
    _log_notes(chosen)
    return _command(model, output_dir, concepts_list, chosen, resume)


def _command(model: str, output_dir, concepts_list, chosen: TrainingFlags, resume: bool) -> list[str]:
    return build_train_command(pretrained_model_name_or_path=model, output_dir=output_dir,
                               concepts_list=concepts_list,
                               resume_from_checkpoint="latest" if resume else None, **chosen.flags)


def _log_notes(chosen: TrainingFlags) -> None:
    for note in chosen.notes:
        logger.info("%s", note)
    if chosen.warning:
        logger.warning("%s", chosen.warning)


def shown_training_command(model: str, output_dir, concepts_list, resume: bool, options: dict[str, Any]) -> list[str]:
    """The training command for this machine's GPU memory, shown with its notes."""
    options.setdefault("gpu_gib", gpu_memory_gib())
    chosen = training_flags(model, **options)
    argv = _command(model, output_dir, concepts_list, chosen, resume)
    logger.info("%s\n", shlex.join(mask_secrets(argv)))
    _log_notes(chosen)
    return argv
