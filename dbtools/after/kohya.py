"""LoRA files for AUTOMATIC1111 and ComfyUI: diffusers/peft LoRA -> kohya-style names.

A diffusers LoRA (`pytorch_lora_weights.safetensors`, as `save_lora_weights` writes it)
names its tensors after diffusers modules (`unet.down_blocks.1...to_q.lora.down.weight`).
AUTOMATIC1111, ComfyUI and kohya's scripts read one flat namespace instead:

- `lora_unet_<module path with _>.lora_down.weight` / `.lora_up.weight` for the UNet,
- `lora_te1_...` for the (first) text encoder and `lora_te2_...` for SDXL's second,
  with transformers' `text_model.` module path (`lora_te1_text_model_encoder_layers_0_...`),
- one `<module>.alpha` per module: the LoRA's alpha (scale = alpha / rank).

diffusers' `convert_all_state_dict_to_peft` / `convert_state_dict_to_kohya` do the renaming;
this module adds what they leave out: the real alphas (they write alpha = rank) and the
`text_model.` path that transformers 5 no longer puts in `CLIPTextModel` state dicts.
As kohya's scripts do, an SD 1.x/2.x file names its one text encoder `lora_te_` (AUTOMATIC1111
maps SD 2.x's OpenCLIP layers only from that prefix), SDXL's two `lora_te1_`/`lora_te2_`.

The file's metadata holds kohya's `ss_*` keys and the `modelspec.*` keys of kohya's scripts
(`kohya_metadata`). The web UIs sort LoRAs by them: AUTOMATIC1111 takes a file as SDXL when
`ss_base_model_version` starts with `sdxl_`, as SD 2.x when `ss_v2` is `True`, else as SD 1.x
if it has any metadata; Forge needs `modelspec.architecture` (`stable-diffusion-v1/lora`)
to show a file as SD 1.x. ComfyUI ignores the metadata.

A family whose UI layout is more than renamed prefixes converts the tensors itself
(`UILora.convert`): Flux.1 LoRAs get kohya's Flux layout (`lora_unet_double_blocks_0_img_attn_qkv`,
...: the original transformer's module names, see `dbtools.families.flux_files`) and kohya's Flux
metadata (`ss_base_model_version` `flux1`, `modelspec.architecture` `flux-1-dev/lora`, by which Forge
lists them under Flux; `ss_network_module` `networks.lora_flux`; no prediction type).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from dbtools.core.atomic import atomic_write
from dbtools.core.errors import UserError
from dbtools.families import registry
from dbtools.families.base import EPSILON, V_PREDICTION, ModelFamily
from dbtools.families.lora_layout import LoraLayoutError
from dbtools.families.models import detect_family
from dbtools.train.checkpoints import ARGS_FILE, ui_lora_file

logger = logging.getLogger(__name__)

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
NETWORK_MODULE = "networks.lora"
"""`ss_network_module` of a plain LoRA in kohya's scripts."""
# TrainConfig fields -> kohya metadata keys that mean the same (values written with str()).
_ARGS_TO_SS = {"learning_rate": "ss_learning_rate", "lr_scheduler": "ss_lr_scheduler",
               "lr_warmup_steps": "ss_lr_warmup_steps", "max_train_steps": "ss_max_train_steps",
               "train_batch_size": "ss_batch_size_per_device", "mixed_precision": "ss_mixed_precision",
               "gradient_accumulation_steps": "ss_gradient_accumulation_steps",
               "gradient_checkpointing": "ss_gradient_checkpointing", "seed": "ss_seed",
               "max_grad_norm": "ss_max_grad_norm", "prior_loss_weight": "ss_prior_loss_weight",
               "hflip": "ss_flip_aug", "snr_gamma": "ss_min_snr_gamma", "num_train_epochs": "ss_num_epochs",
               # flow matching, as kohya's Flux scripts record it
               "guidance_scale": "ss_guidance_scale", "weighting_scheme": "ss_weighting_scheme",
               "logit_mean": "ss_logit_mean", "logit_std": "ss_logit_std", "mode_scale": "ss_mode_scale"}


class LoraConvertError(UserError):
    """A LoRA file cannot be converted because of something the user can fix."""


def to_peft_names(state_dict: Mapping) -> dict:
    """A diffusers LoRA state dict with peft names (`lora_A`/`lora_B`), the text encoders'
    modules under `text_model.` as in the kohya layout.

    Each component is converted on its own: diffusers writes the UNet's tensors as
    `lora.down`/`lora.up` but a text encoder's as `lora_linear_layer.down`/`.up`.
    """
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft

    groups: dict[str, dict] = {}
    for key, tensor in state_dict.items():
        groups.setdefault(key.split(".", 1)[0], {})[key] = tensor
    peft = {}
    for component, part in groups.items():
        # diffusers renames only some modules (Flux's attention but not its other linears): convert the rest
        rest = {k: v for k, v in part.items() if ".lora_A." not in k and ".lora_B." not in k}
        peft.update({k: v for k, v in part.items() if k not in rest})
        try:
            peft.update(convert_all_state_dict_to_peft(rest) if rest else {})
        except ValueError as exc:
            raise LoraConvertError(f"{component}: not a diffusers LoRA state dict ({exc}).") from exc
    return {_with_text_model(k): v for k, v in peft.items()}


def _with_text_model(key: str) -> str:
    return re.sub(r"^(text_encoder(?:_2)?\.)(?!text_model\.)", r"\1text_model.", key)


def to_kohya(state_dict: Mapping, alpha: float | Mapping[str, float] | None = None,
             family: ModelFamily | str | None = None) -> dict:
    """Kohya-style LoRA tensors (`lora_unet_*`, `lora_te1_*`, `lora_te2_*` + `.alpha`).

    `state_dict` is a diffusers LoRA (diffusers or peft key names, with `unet.`,
    `text_encoder.`, `text_encoder_2.` prefixes). `alpha` is the LoRA's `lora_alpha`: one
    number for all modules, a dict from component ("unet", "text_encoder",
    "text_encoder_2") to number, or None for alpha = rank (scale 1, what diffusers assumes
    for a file without alphas). Weights are kept as they are (same dtype, same values).
    `family` (a `ModelFamily` or its key) gives each component's prefix (`ModelFamily.ui_lora`:
    SD 1.x/2.x name their one text encoder `lora_te_`, SDXL `lora_te1_`/`lora_te2_`), or
    converts the tensors itself (`UILora.convert`: Flux.1's original module names); when None,
    the first family that has all of the LoRA's components.
    """
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    family = _family(family) or _first(registry.families_with_parts({k.split(".", 1)[0] for k in state_dict}))
    convert = family.ui_lora(EPSILON).convert if family is not None else None
    if convert is not None:
        try:
            return convert(to_peft_names(state_dict), alpha)
        except LoraLayoutError as exc:
            raise LoraConvertError(str(exc)) from exc
    peft = to_peft_names(state_dict)
    unknown = sorted(k for k in peft if not k.startswith(("unet.", "text_encoder.", "text_encoder_2.", "transformer.")))
    if unknown:
        raise LoraConvertError(f"LoRA tensor {unknown[0]} belongs to no denoiser or text encoder; only their "
                               "LoRAs can be converted.")
    out = convert_state_dict_to_kohya(peft)
    for key in [k for k in out if k.endswith(".alpha")]:
        module = key[: -len(".alpha")]
        rank = out[module + ".lora_down.weight"].shape[0]
        value = _alpha_for(module, alpha, rank)
        out[key] = torch.tensor(float(value), dtype=torch.float32)
    prefixes = family.ui_lora(EPSILON).prefixes if family is not None else {}
    renames = {p: prefixes.get(c, p) for p, c in _COMPONENTS.items()}
    return {_renamed(k, renames): v for k, v in out.items()}


def _renamed(key: str, renames: Mapping[str, str]) -> str:
    old = next((p for p in renames if key.startswith(p)), None)
    return key if old is None else renames[old] + key[len(old):]


def _family(family: ModelFamily | str | None) -> ModelFamily | None:
    return registry.get(family) if isinstance(family, str) else family


def _first(families: list[ModelFamily]) -> ModelFamily | None:
    return families[0] if families else None


def _alpha_for(module: str, alpha: float | Mapping[str, float] | None, rank: int) -> float:
    if alpha is None:
        return rank
    if isinstance(alpha, Mapping):
        component = next(c for p, c in _COMPONENTS.items() if module.startswith(p))
        return alpha.get(component, rank)
    return alpha


_COMPONENTS = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
               "transformer_": "transformer"}
"""The prefixes diffusers' `convert_state_dict_to_kohya` writes, per component."""


def kohya_metadata(family: ModelFamily | str, rank: int, alpha: float, output_name: str, *, v_prediction: bool = False,
                   resolution: int | None = None, steps: int | None = None, training_comment: str | None = None,
                   args: Mapping | None = None) -> dict[str, str]:
    """The safetensors metadata kohya's scripts write into a LoRA file, for our LoRA.

    `family` is a `ModelFamily` (or its key), whose `ui_lora` names the base model; `rank` and
    `alpha` the LoRA's (`ss_network_dim`, `ss_network_alpha`); `output_name` its name in the UIs
    (`ss_output_name`, `modelspec.title`);
    `steps` the optimizer steps trained. `args` is a training run's `args.json`: the settings
    kohya also records (learning rate, scheduler, batch size, seed, precision, base model)
    are taken from it. Values are strings, as safetensors metadata must be.
    """
    ui = _family(family).ui_lora(V_PREDICTION if v_prediction else EPSILON)
    meta = {"ss_base_model_version": ui.base_model_version, "ss_v2": str(ui.v2),
            "ss_network_module": ui.network_module, "ss_network_dim": str(int(rank)),
            "ss_network_alpha": str(float(alpha)), "ss_output_name": output_name,
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{ui.architecture}/lora",
            "modelspec.implementation": ui.implementation,
            "modelspec.title": output_name, "modelspec.date": datetime.date.today().isoformat()}
    if ui.prediction_type:
        meta["modelspec.prediction_type"] = "v" if v_prediction else "epsilon"
    args = dict(args or {})
    meta.update({key: str(args[name]) for name, key in _ARGS_TO_SS.items() if args.get(name) is not None})
    if args.get("pretrained_model_name_or_path"):
        meta["ss_sd_model_name"] = Path(str(args["pretrained_model_name_or_path"])).name
    resolution = resolution or args.get("resolution")
    if resolution:
        meta["ss_resolution"] = f"({int(resolution)}, {int(resolution)})"
        meta["modelspec.resolution"] = f"{int(resolution)}x{int(resolution)}"
    if steps is not None:
        meta["ss_steps"] = str(int(steps))
    comment = training_comment if training_comment is not None else args.get("training_comment")
    if comment:
        meta["ss_training_comment"] = str(comment)
    return meta


def read_lora(path: str | os.PathLike) -> dict:
    """The tensors of a diffusers LoRA file, or of a LoRA folder's `pytorch_lora_weights.safetensors`."""
    from safetensors.torch import load_file

    path = lora_file(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise LoraConvertError(f"{path}: not a valid .safetensors file ({exc}). Save the LoRA again.") from exc


def lora_file(path: str | os.PathLike) -> Path:
    """The diffusers LoRA file at `path` (a LoRA folder or the file itself); `LoraConvertError` if none."""
    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise LoraConvertError(f"{path}: not found. Give a LoRA folder (with pytorch_lora_weights.safetensors) "
                               "or the .safetensors file itself.")
    return path


def lora_alphas(path: str | os.PathLike) -> dict[str, float]:
    """{component: lora_alpha} from the adapter settings diffusers' `save_lora_weights` writes into
    a LoRA file's metadata (`lora_adapter_metadata`); {} when it has none."""
    try:
        settings = json.loads(read_metadata(lora_file(path)).get("lora_adapter_metadata") or "{}")
    except ValueError:
        return {}
    return {key.split(".", 1)[0]: float(value) for key, value in settings.items()
            if key.endswith(".lora_alpha") and value is not None}


def write_kohya_lora(lora: str | os.PathLike | Mapping, out: str | os.PathLike,
                     alpha: float | Mapping[str, float] | None = None, half: bool = False,
                     metadata: Mapping[str, str] | None = None, family: ModelFamily | str | None = None) -> Path:
    """Write a kohya-style LoRA `.safetensors` that AUTOMATIC1111, Forge and ComfyUI load; return its path.

    `lora` is a diffusers LoRA folder or file, or its state dict; `alpha` and `family` as in
    `to_kohya` (`family` defaults to the one `metadata` names; `alpha` to the alphas in a LoRA
    file's adapter settings, else the rank).
    `metadata` (see `kohya_metadata`) goes into the file's header. With `half`, floating-point
    tensors are stored as fp16. The file appears only when complete.
    """
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise LoraConvertError(f"{out}: name the LoRA file .safetensors (AUTOMATIC1111 and ComfyUI pick their "
                               "reader by the extension).")
    family = family or family_of_metadata(metadata or {})
    path = isinstance(lora, (str, os.PathLike))
    if alpha is None and path:
        alpha = lora_alphas(lora) or None
    tensors = to_kohya(read_lora(lora) if path else lora, alpha, family)
    if half:
        tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    header = {**{k: str(v) for k, v in (metadata or {}).items()}, "format": "pt"}
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=header))
    logger.info("wrote %s: %d LoRA modules", out, sum(k.endswith(".alpha") for k in tensors))
    return out


def family_of_metadata(metadata: Mapping[str, str]) -> ModelFamily | None:
    """The family whose `ss_base_model_version` the metadata holds; None when absent."""
    version = str(metadata.get("ss_base_model_version", ""))
    return next((f for f in registry.FAMILIES
                 if version in {f.ui_lora(p).base_model_version for p in (EPSILON, V_PREDICTION)}), None)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata header of a `.safetensors` file ({} when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def lora_folder_metadata(folder: str | os.PathLike, name: str) -> dict[str, str]:
    """kohya metadata for a LoRA step folder exported as `name`.

    The UI file that training wrote into the folder gives it (renamed to `name`); for a folder
    without one, it is built from the folder's `args.json` and the base model's family (read from
    the base model named there, else the one family that has all of the LoRA's components). {} when the
    family cannot be told: the UIs then list the file as SD 1.x or "unknown".
    """
    folder = Path(folder)
    written = ui_lora_file(folder)
    meta = read_metadata(written) if written is not None else {}
    if family_of_metadata(meta):
        meta.pop("format", None)
        return {**meta, "ss_output_name": name, "modelspec.title": name}
    try:
        args = json.loads((folder / ARGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        args = {}
    tensors = read_lora(folder)
    family, v_prediction = _base_family(args, tensors)
    if family is None:
        logger.warning("%s: the base model is not known (no args.json naming a readable model); the LoRA file "
                       "gets no ss_base_model_version, so the web UIs may list it under another SD version", folder)
        return {}
    rank = next(v.shape[0] for k, v in to_peft_names(tensors).items() if ".lora_A." in k)
    steps = int(folder.name) if folder.name.isdigit() else None
    alpha = lora_alphas(folder).get(family.denoiser) or args.get("lora_alpha") or rank
    return kohya_metadata(family, rank, alpha, name, v_prediction=v_prediction, steps=steps, args=args)


def lora_family(folder: str | os.PathLike) -> ModelFamily | None:
    """The family of the model a LoRA step folder was trained on: its `args.json`'s base model,
    else the one family with all of the LoRA's components; None when neither tells."""
    try:
        args = json.loads((Path(folder) / ARGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        args = {}
    return _base_family(args if isinstance(args, dict) else {}, read_lora(folder))[0]


def _base_family(args: Mapping, tensors: Mapping) -> tuple[ModelFamily | None, bool]:
    """(family, v-prediction) of the model a LoRA was trained on, from its run's base model."""
    base = args.get("pretrained_model_name_or_path")
    if base:
        try:
            detected = detect_family(str(base), revision=args.get("revision"))
            return detected.family, detected.prediction_type == V_PREDICTION
        except (UserError, OSError, ValueError) as exc:
            logger.info("base model %s not readable here (%s); telling the family from the LoRA", base, exc)
    candidates = registry.families_with_parts({k.split(".", 1)[0] for k in tensors})
    return (candidates[0] if len(candidates) == 1 else None), False
