"""Loading Stable Diffusion models: Hub ids, diffusers folders and single files.

Every stage gets its models from here, so the user's Hub model, a local training output
and the tiny test models all take the same path. What we promise:

- `--pretrained_model_name_or_path` may be a Hub id, a diffusers folder, or a single
  `.safetensors`/`.ckpt` file (read with diffusers' single-file loader; pickles are only
  ever read with `weights_only=True`, so a file that would run code is refused).
- `--revision fp16` (the old way to ask for half weights) becomes `variant="fp16"` for
  Hub ids; when a repo or folder has no such variant we warn and use the full weights.
  Local folders and files have no revisions, so a revision is ignored for them.
- A mistake a user can make (a path that does not exist, a folder that is not a model,
  a missing component, an unsafe pickle) raises one `ModelLoadError` naming the path and
  the fix, instead of a traceback from deep inside diffusers.
- The model family (SD 1.x, SD 2.x, SDXL; see `dbtools.families.detect`) is detected from the
  model itself (`detect_family`), and generation loads the family's pipeline class.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from dbtools.core.errors import UserError
from dbtools.families import registry
from dbtools.families.base import Components, Detected, ModelFamily, UnsupportedFamily
from dbtools.families.detect import prediction_type_from_scheduler
from dbtools.families.quantize import is_quantized, load_quantized

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import StableDiffusionPipeline

logger = logging.getLogger(__name__)

SINGLE_FILE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
"""Extensions of single-file checkpoints (the original Stable Diffusion layout)."""

SINGLE_FILE_CONFIG_ENV = "DBTOOLS_SINGLE_FILE_CONFIG"
"""Environment variable naming a diffusers folder (or Hub id) whose configs describe a
single-file checkpoint; used when no `config` argument is given."""

COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
_CONFIG_FILES = {
    "tokenizer": ("tokenizer_config.json", "vocab.json", "tokenizer.json"),
    "text_encoder": ("config.json",),
    "model": ("config.json",),
    "scheduler": ("scheduler_config.json",),
}
_WEIGHT_STEMS = {"text_encoder": ("model", "pytorch_model"), "model": ("diffusion_pytorch_model",)}


def _kind(component: str) -> str:
    """What a component folder holds: "tokenizer", "text_encoder" (transformers), "scheduler",
    or "model" (a diffusers model: VAE, UNet, transformer)."""
    return next((k for k in ("tokenizer", "text_encoder", "scheduler") if component.startswith(k)), "model")


def config_files(component: str) -> tuple[str, ...]:
    """The config file names a component folder has (one of them)."""
    return _CONFIG_FILES[_kind(component)]


def weight_stems(component: str) -> tuple[str, ...] | None:
    """Weight file stems of a component folder (transformers folders saved before safetensors
    use `pytorch_model.bin`); None for folders without weights (tokenizers, schedulers)."""
    return _WEIGHT_STEMS.get(_kind(component))

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpm++_sde": "DPMSolverSDEScheduler",
    "unipc": "UniPCMultistepScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}
"""Sampler names accepted by `load_pipeline(scheduler=...)` -> diffusers class names; one
entry per scheduler. `scheduler_key` also takes the class names, AUTOMATIC1111's names and
`dpmsolver++`."""

A1111_SAMPLERS = {
    "ddim": "DDIM", "ddpm": "DDPM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a",
    "heun": "Heun", "dpm++": "DPM++ 2M", "dpm++_sde": "DPM++ SDE", "unipc": "UniPC", "flow_euler": "Flow Euler",
}
"""AUTOMATIC1111's sampler name for each of `SCHEDULERS` (what its PNG Info shows)."""


def _fold(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


_SCHEDULER_ALIASES = {"dpmsolver++": "dpm++", **{_fold(c): k for k, c in SCHEDULERS.items()},
                      **{_fold(a): k for k, a in A1111_SAMPLERS.items()}}


def scheduler_key(name: str) -> str | None:
    """The `SCHEDULERS` key for `name` (a key, a diffusers class name, an AUTOMATIC1111 sampler
    name or `dpmsolver++`, any case); None when it names no known scheduler."""
    key = _fold(name)
    return key if key in SCHEDULERS else _SCHEDULER_ALIASES.get(key)


class ModelLoadError(UserError):
    """A model cannot be loaded because of something the user can fix; the message says what."""


class UnsupportedModelError(ModelLoadError):
    """The model is of a family this toolkit recognises but does not train."""


SDComponents = Components
"""The loaded training components (`families.base.Components`), by the name `Run` still uses."""


# --------------------------------------------------------------------------- pure rules


def is_single_file(path: str | os.PathLike) -> bool:
    """True when `path` names a single-file checkpoint (`.safetensors`, `.ckpt`, `.pt`, `.bin`)."""
    return str(path).lower().endswith(SINGLE_FILE_EXTENSIONS)


def looks_like_local_path(name: str) -> bool:
    """True when `name` cannot be a Hub repo id, so it must be meant as a local path."""
    if os.path.isabs(name) or name.startswith((".", "~")) or re.match(r"^[A-Za-z]:[\\/]", name):
        return True
    if "\\" in name or name.count("/") > 1 or is_single_file(name):
        return True
    return not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name)


def is_local(name: str) -> bool:
    """True when `name` is (or is meant to be) a path on this machine rather than a Hub id."""
    return os.path.exists(os.path.expanduser(name)) or looks_like_local_path(name)


_SAID_REVISION: set[tuple[str, str]] = set()


def resolve_revision(
    model_name_or_path: str, revision: str | None, variant: str | None
) -> tuple[str | None, str | None]:
    """Map the command line's `revision`/`variant` to what diffusers expects.

    `revision="fp16"` (Shivam's scripts, the seed notebook) means half weights; modern Hub
    repos publish those as `variant="fp16"`, so for a Hub id it becomes `(None, "fp16")`
    (an explicit `variant` wins). Local folders and single files have no git revisions,
    so the revision is dropped for them: `(None, variant)`. Other revisions (a branch,
    tag or commit) are passed through for Hub ids.
    """
    if is_local(model_name_or_path):
        if revision and (model_name_or_path, revision) not in _SAID_REVISION:
            _SAID_REVISION.add((model_name_or_path, revision))  # once per process, not per load
            logger.info("%s is a local path: ignoring --revision %s", model_name_or_path, revision)
        return None, variant
    if revision in ("fp16", "bf16"):
        return None, variant or revision
    return revision or None, variant


def weight_variants(component_dir: str | os.PathLike) -> tuple[bool, set[str]]:
    """(has full weights, variants) of a component folder: `model.fp16.safetensors` -> "fp16"."""
    folder = Path(component_dir)
    plain, variants = False, set()
    if not folder.is_dir():
        return plain, variants
    for p in folder.iterdir():
        base, ext = os.path.splitext(p.name)
        if ext not in (".safetensors", ".bin"):
            continue
        base = re.sub(r"-\d+-of-\d+$", "", base)  # shards: name-00001-of-00002
        _, _, variant = base.partition(".")
        if variant:
            variants.add(variant)
        else:
            plain = True
    return plain, variants


def has_variant(folder: str | os.PathLike, variant: str) -> bool:
    """True when a model folder, or one component folder, holds `<variant>` weights."""
    folder = Path(folder)
    subs = [folder] + ([folder / c for c in COMPONENTS] if folder.is_dir() else [])
    return any(variant in weight_variants(sub)[1] for sub in subs)


def model_folder_problems(
    folder: str | os.PathLike, needed: tuple[str, ...] = COMPONENTS
) -> list[str]:
    """What stops `folder` from being loaded as a diffusers Stable Diffusion folder.

    Returns messages naming the missing piece and the fix; an empty list means loadable.
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file() and not any((folder / c).is_dir() for c in COMPONENTS):
        return [_not_a_model_message(folder)]
    problems = []
    for name in needed:
        sub = folder / name
        if not sub.is_dir():
            problems.append(f"{folder}: the '{name}' folder is missing. The model is incomplete: "
                            "copy or download the whole model folder again.")
        elif not any((sub / f).is_file() for f in config_files(name)):
            problems.append(f"{sub}: no {config_files(name)[0]}. The model is incomplete: copy or "
                            "download the whole model folder again.")
        elif weight_stems(name) and not _has_weights(sub, weight_stems(name)):
            problems.append(f"{sub}: no weights ({weight_stems(name)[0]}.safetensors). The download or "
                            "save was interrupted: copy or download the model folder again.")
    return problems


def _has_weights(sub: Path, stems: tuple[str, ...]) -> bool:
    return any(p.name.startswith(stems) and p.suffix in (".safetensors", ".bin") for p in sub.iterdir())


def _not_a_model_message(folder: Path) -> str:
    hint = "Point to the folder that contains model_index.json"
    files = sorted(p.name for p in folder.iterdir() if is_single_file(p.name)) if folder.is_dir() else []
    steps = sorted((p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=int) \
        if folder.is_dir() else []
    if files:
        hint = f"To use a single-file checkpoint, pass the file itself, e.g. {folder / files[0]}"
    elif steps:
        hint = f"This looks like a training output folder: pass one step folder, e.g. {folder / steps[-1]}"
    return (f"{folder}: not a diffusers model folder (no model_index.json, unet/, vae/ ...). "
            f"{hint}, or a Hub id like stable-diffusion-v1-5/stable-diffusion-v1-5.")


def check_model_path(model_name_or_path: str, needed: tuple[str, ...] | None = None,
                     skip: tuple[str, ...] = ()) -> None:
    """Raise `ModelLoadError` for a local model path that cannot be loaded (before loading).

    A folder must hold the `needed` components; by default those its family needs for
    generation (`ModelFamily.components`), less `skip` (e.g. "vae" when another VAE is given)."""
    if not model_name_or_path or not str(model_name_or_path).strip():
        raise ModelLoadError("No model given: set --pretrained_model_name_or_path to a Hub id "
                             "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), a diffusers "
                             "folder or a .safetensors/.ckpt file.")
    if not is_local(model_name_or_path):
        return
    path = Path(os.path.expanduser(model_name_or_path))
    if not path.exists():
        raise ModelLoadError(f"{path}: does not exist. Fix the model path (is Google Drive mounted?) "
                             "or give a Hub id like stable-diffusion-v1-5/stable-diffusion-v1-5.")
    if path.is_file():
        if not is_single_file(path):
            raise ModelLoadError(f"{path}: not a model file. Give a .safetensors or .ckpt checkpoint, "
                                 "or a diffusers folder containing model_index.json.")
        return
    _refuse_other_family(path)
    if needed is None:
        needed = tuple(c for c in _folder_components(path) if c not in skip)
    problems = model_folder_problems(path, needed)
    if problems:
        raise ModelLoadError("\n".join(problems))


def _folder_components(folder: Path) -> tuple[str, ...]:
    """The components of a folder's family (SD 1.x's when its files cannot tell)."""
    try:
        return folder_family(folder).components
    except (UserError, OSError, ValueError):
        return COMPONENTS


def pipeline_family(pipe) -> ModelFamily:
    """The family of a loaded pipeline: by its class (`ModelFamily.pipeline_class`), else (a
    wrapper, a renamed class) the family with the most components that it holds them all."""
    name = type(pipe).__name__
    family = next((f for f in registry.FAMILIES if name in (f.pipeline_class, *f.pipeline_names)), None)
    if family is not None:
        return family
    present = {c for c, m in (getattr(pipe, "components", None) or {}).items() if m is not None}
    fits = [f for f in registry.FAMILIES if set(f.components) <= present]
    if not fits:
        raise ModelLoadError(f"a {name} is not a pipeline of a family this toolkit trains "
                             f"({registry.trained_labels()}).")
    return max(fits, key=lambda f: len(f.components))


def folder_model_index(folder: str | os.PathLike) -> dict:
    """The `model_index.json` of a diffusers folder; for a folder saved without one, rebuilt
    from its component folders' configs (diffusers' `_class_name`, transformers' `architectures`)."""
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text(encoding="utf-8"))
        return index if isinstance(index, dict) else {}
    index: dict = {}
    for sub in sorted(p for p in folder.iterdir() if (p / "config.json").is_file()):
        config = json.loads((sub / "config.json").read_text(encoding="utf-8"))
        cls = config.get("_class_name") or (config.get("architectures") or [None])[0]
        if cls:
            index[sub.name] = ["diffusers" if "_class_name" in config else "transformers", cls]
    return index


def folder_family(folder: str | os.PathLike) -> ModelFamily:
    """The family of a local diffusers folder (`folder_model_index` and its text encoder's config);
    `UnsupportedFamily` for one we do not train."""
    folder = Path(folder)
    text_file = folder / "text_encoder" / "config.json"
    text = json.loads(text_file.read_text(encoding="utf-8")) if text_file.is_file() else None
    return registry.family_for_model_index(folder_model_index(folder), text)


def _refuse_other_family(folder: Path) -> None:
    """A pipeline folder of a family we do not train is named before its parts are checked
    (a Flux folder is not "missing its unet")."""
    index_file = folder / "model_index.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # absent or unreadable: model_folder_problems says so
    try:
        registry.family_for_model_index(index if isinstance(index, dict) else {})
    except UnsupportedFamily as exc:
        raise UnsupportedModelError(f"{folder} is {exc}.") from None


# --------------------------------------------------------------------------- devices


def pick_device(device: str | None = None) -> str:
    """`device` when one is given (e.g. a `--device` flag), else the best one here:
    "cuda", then Apple "mps", else "cpu"."""
    import torch

    if device is not None:
        return str(device)
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def inference_dtype(device, family: ModelFamily | None = None) -> torch.dtype:
    """Half precision on CUDA (half the memory, same pictures): the family's own
    (`ModelFamily.inference_half`: bf16 for the flow transformers, fp16 by default); fp32
    elsewhere (CPU half precision is slow/unsupported)."""
    import torch

    if not str(device).startswith("cuda"):
        return torch.float32
    return getattr(torch, family.inference_half if family is not None else "float16")


def model_inference_dtype(model_name_or_path: str, device) -> torch.dtype:
    """`inference_dtype` for the family of a model, training checkpoint or LoRA weights folder
    (the family of the run's base model); a model that cannot be read here gets the default,
    and loading says why."""
    if not str(device).startswith("cuda"):
        return inference_dtype(device)
    name = os.fspath(model_name_or_path)
    try:
        if is_checkpoint_folder(name) or is_lora_weights_folder(name):
            name = _checkpoint_args(Path(os.path.expanduser(name)))["pretrained_model_name_or_path"]
        return inference_dtype(device, detect_family(name).family)
    except ModelLoadError:
        return inference_dtype(device)


# --------------------------------------------------------------------------- safe loading


def safe_torch_load(path: str | os.PathLike) -> dict:
    """Read a `.ckpt`/`.pt`/`.bin` file with `torch.load(weights_only=True)` and return its dict.

    Only tensors and plain containers are accepted: a pickle that would import or call
    anything else (a way to run code on this machine) raises `ModelLoadError` naming the file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: file not found. Fix the path.")
    mmap = zipfile.is_zipfile(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"{path}: refused to load. This pickle file contains Python objects that could run "
            "code on this machine, not just weights. Get a .safetensors version of the model, "
            f"or convert this one on a machine you do not mind exposing. ({_first_line(exc)})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read this checkpoint ({_first_line(exc)}). The file is "
                             "truncated or not a PyTorch checkpoint: download it again.") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: holds a {type(data).__name__}, not a state dict of weights.")
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_single_file(path: Path) -> None:
    """Refuse unsafe or unreadable single files before diffusers touches them."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(f"{path}: not a valid .safetensors file ({_first_line(exc)}). "
                                 "The download was probably interrupted: download it again.") from exc
    else:
        safe_torch_load(path)


# --------------------------------------------------------------------------- families


def detect_family(model_name_or_path: str, *, config: str | None = None,
                  revision: str | None = None) -> Detected:
    """The family and prediction type of a Hub id, diffusers folder or single file.

    A folder or Hub id is read from its `model_index.json`, text encoder config and scheduler
    config (a few small files; nothing is loaded). A single file is read from its tensor
    names; its prediction type comes from `config` (a diffusers folder or Hub id, or
    $DBTOOLS_SINGLE_FILE_CONFIG) when given. Raises `ModelLoadError` when the model cannot
    be read or is none of SD 1.x, 2.x and XL (naming the family when it is a known one).
    """
    name = _normalize(model_name_or_path)
    try:
        detected = _detect_family(name, config, revision)
    except UnsupportedFamily as exc:
        raise UnsupportedModelError(f"{name} is {exc}.") from None
    refusal = detected.family.name_refusal(name)
    if refusal:
        raise UnsupportedModelError(f"{name}: {refusal}")
    return detected


def _detect_family(name: str, config: str | None, revision: str | None) -> Detected:
    path = Path(name)
    if is_local(name) and path.is_file():
        keys = frozenset(single_file_keys(path))
        family = registry.family_for_keys(keys)
        if family is None:
            raise ModelLoadError(f"{path}: not a Stable Diffusion 1.x/2.x/XL checkpoint (none of its tensor "
                                 "names is a known text encoder's). Give an SD 1.x, 2.x or XL model.")
        config = single_file_config(config)
        if config:
            scheduler = _read_json(config, "scheduler/scheduler_config.json", None)
            return Detected(family, prediction_type_from_scheduler(scheduler))
        return Detected(family, family.prediction_type_from_keys(keys))
    index = _read_json(name, "model_index.json", revision)
    text = _read_json(name, "text_encoder/config.json", revision, required=False)
    scheduler = _read_json(name, "scheduler/scheduler_config.json", revision, required=False)
    return Detected(registry.family_for_model_index(index, text), prediction_type_from_scheduler(scheduler))


def single_file_keys(path: str | os.PathLike) -> list[str]:
    """Tensor names of a single-file checkpoint (a `.ckpt`'s nested `state_dict` unwrapped)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        _check_single_file(path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    data = safe_torch_load(path)
    return list(data.get("state_dict", data))


def _read_json(name: str, file: str, revision: str | None, required: bool = True) -> dict | None:
    """One small JSON file of a model folder or Hub repo; None when absent and not `required`."""
    import json

    if is_local(name):
        path = Path(name) / file
        if not path.is_file():
            if required:
                check_model_path(name)  # names what is missing
                raise ModelLoadError(f"{name}: no {file}. Point to the folder that contains model_index.json.")
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        local = _guard(name, lambda: hf_hub_download(name, file, revision=revision))
    except ModelLoadError as exc:
        if not required and isinstance(exc.__cause__, EntryNotFoundError):
            return None
        raise
    return json.loads(Path(local).read_text(encoding="utf-8"))


def pipeline_class(family: ModelFamily):
    """The diffusers pipeline class that loads `family` (e.g. `StableDiffusionXLPipeline`)."""
    import diffusers

    return getattr(diffusers, family.pipeline_class)


def _pipeline_kwargs(family: ModelFamily) -> dict:
    """What the family's pipeline class is given besides its components (`pipeline_kwargs`)."""
    return family.pipeline_kwargs()


# --------------------------------------------------------------------------- loading


def single_file_config(config: str | None = None) -> str | None:
    """The diffusers config source for single files: `config`, else $DBTOOLS_SINGLE_FILE_CONFIG."""
    return config or os.environ.get(SINGLE_FILE_CONFIG_ENV) or None


def load_sd_components(
    model_name_or_path: str,
    *,
    vae_name_or_path: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    tokenizer_name: str | None = None,
    torch_dtype=None,
    config: str | None = None,
    original_config: str | None = None,
    component_dtypes: dict | Callable[[ModelFamily], dict] | None = None,
    quantize: str | None = None,
    options=None,
    only: Callable[[ModelFamily], Iterable[str] | None] | None = None,
    straight_to: Callable[[ModelFamily], dict] | None = None,
) -> Components:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM noise scheduler for training; for
    an SDXL model also its second tokenizer and text encoder (see `detect_family`).

    `model_name_or_path` is a Hub id, a diffusers folder or a single checkpoint file (for
    which `config`, a diffusers folder or Hub id with the model's configs, avoids a
    download; see `load_pipeline`). Weights come in `torch_dtype` (default float32, also
    for fp16 variants, so an optimizer never sees half-precision master weights); a
    component named in `component_dtypes` (e.g. `{"unet": torch.float16}` for a frozen
    UNet; or a function of the detected family giving that dict) is read straight into its own
    dtype, never held in float32 first (except from a single file, which is read whole in
    `torch_dtype`). `quantize` ("nf4", "int8") loads the frozen denoiser quantized; `options`
    (the run's settings) go to the family (`ModelFamily.load_components`). `only`, a function of
    the family, names the components to load (None: all), e.g. all but the denoiser;
    `straight_to`, a function of the family, gives components -> the device they are read
    straight onto (frozen parts that go there next: host memory never holds them whole).
    """
    import torch

    dtype = torch_dtype or torch.float32
    model_name_or_path, revision, variant, _ = _resolve_source(model_name_or_path, revision, variant, needed=())
    family = _training_family(model_name_or_path, config, revision)
    wanted = only(family) if only else None
    wanted = set(family.parts if wanted is None else wanted)
    vae_name_or_path = vae_name_or_path if "vae" in wanted else None
    tokenizer_name = tokenizer_name if "tokenizer" in wanted else None
    needed = tuple(c for c in family.components if not (c == "vae" and vae_name_or_path)
                   and not (c == "tokenizer" and tokenizer_name) and c in wanted | {"scheduler"})
    check_model_path(model_name_or_path, needed)
    if callable(component_dtypes):
        component_dtypes = component_dtypes(family)
    dtypes = {c: (component_dtypes or {}).get(c, dtype) for c in family.parts}
    if is_local(model_name_or_path) and Path(os.path.expanduser(model_name_or_path)).is_file():
        pipe = _load_single_file(model_name_or_path, dtype, config, original_config)
        models = Components(family, {c: getattr(pipe, c) for c in family.parts},
                            family.noise_scheduler(pipe.scheduler.config))
    else:
        loader = _PartLoader(model_name_or_path, revision, variant, dtypes, straight_to(family) if straight_to else {})
        models = family.load_components(loader, needed,
                                        quantize=quantize, options=options)
    if tokenizer_name:
        models.parts["tokenizer"] = _load_tokenizer(_normalize(tokenizer_name), _tokenizer_subfolder(tokenizer_name),
                                                    revision)
    if vae_name_or_path:
        models.parts["vae"] = load_vae(vae_name_or_path, torch_dtype=dtypes["vae"], base_model=model_name_or_path)
    for c, module in models.parts.items():
        if not c.startswith("tokenizer"):
            models.parts[c] = _as_dtype(module, dtypes[c])
    return models


class _PartLoader:
    """`families.base.PartLoader` for a Hub id or diffusers folder: one `from_pretrained` per
    component, in `dtypes[component]` (on `devices[component]` when given), a missing variant
    falling back to the full weights."""

    def __init__(self, name: str, revision: str | None, variant: str | None, dtypes: dict, devices=None):
        self.name, self.revision, self.variant, self.dtypes = name, revision, variant, dtypes
        self.devices = devices or {}

    def model(self, class_path: str, component: str, *, quantize: str | None = None):
        if quantize is not None:
            # Straight onto the device that trains (bitsandbytes quantizes as the weights arrive).
            return _guard(self.name, lambda: load_quantized(
                _class(class_path), self.name, quantize, dtype=self.dtypes[component], device=pick_device(),
                subfolder=component, revision=self.revision, variant=self.variant))
        device = self.devices.get(component)
        return _from_pretrained(_class(class_path), self.name, component, self.revision, self.variant,
                                self.dtypes[component], **({"device": device} if device is not None else {}))

    def tokenizer(self, class_path: str, component: str):
        return _load_tokenizer(self.name, component, self.revision, _class(class_path))

    def scheduler_config(self) -> dict:
        from diffusers import DDPMScheduler

        kwargs = {"revision": self.revision} if self.revision else {}
        return _guard(self.name, lambda: DDPMScheduler.load_config(self.name, subfolder="scheduler", **kwargs))


def _class(class_path: str):
    """"diffusers.AutoencoderKL" -> the class."""
    import importlib

    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _resolve_source(name: str, revision: str | None, variant: str | None, *, config: str | None = None,
                    needed: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()):
    """Check a model source before anything loads; return `(name, revision, variant, family)`.

    `name` comes back with `~` expanded, `revision`/`variant` mapped as the flags mean
    them (`resolve_revision`), the variant dropped when the model does not have it. A
    local model must hold `needed` components, or when `needed` is None its family's
    components less `skip`; a missing one is a `ModelLoadError` naming it. `family` is
    detected only when `needed` is None (else None).
    """
    name = _normalize(name)
    check_model_path(name, ())
    revision, variant = resolve_revision(name, revision, variant)
    family = None
    if needed is None:
        family = detect_family(name, config=config, revision=revision).family
        needed = tuple(c for c in family.components if c not in skip)
    check_model_path(name, needed)
    return name, revision, _usable_variant(name, variant), family


def _training_family(name: str, config: str | None, revision: str | None) -> ModelFamily:
    """The family of the model to train, read from its files; a folder of components without
    `model_index.json` is told by its text encoder's config (SD 1.x or 2.x)."""
    path = Path(name)
    if is_local(name) and path.is_dir() and not (path / "model_index.json").is_file():
        text = _read_json(name, "text_encoder/config.json", None, required=False)
        return registry.family_for_model_index({}, text)
    return detect_family(name, config=config, revision=revision).family


def _normalize(name: str) -> str:
    """`~` expanded for local paths; Hub ids unchanged."""
    return os.path.expanduser(str(name)) if name and is_local(str(name)) else name


def _usable_variant(name: str, variant: str | None) -> str | None:
    """`variant`, or None (with one warning) for a local folder or file that does not have it.

    A local folder saved only as a variant (e.g. only `*.fp16.safetensors`) uses that variant.
    """
    if not is_local(name):
        return variant
    path = Path(os.path.expanduser(name))
    if not variant:
        return _only_variant(path / "unet")
    if path.is_dir() and has_variant(path, variant):
        return variant
    logger.warning("%s has no %s weights: using its full-precision weights", name, variant)
    return None


def _only_variant(component_dir: Path) -> str | None:
    """The variant of a folder that has variant weights only (else None: use the full weights)."""
    plain, variants = weight_variants(component_dir)
    if plain or len(variants) != 1:
        return None
    (variant,) = variants
    logger.info("%s has only %s weights: using them", component_dir, variant)
    return variant


def _as_dtype(model, dtype):
    return model if model.dtype == dtype or is_quantized(model) else model.to(dtype)


def _tokenizer_subfolder(name: str) -> str | None:
    """"tokenizer" when `name` is a local model folder (tokenizer in its subfolder), else None."""
    path = Path(os.path.expanduser(name))
    if is_local(name) and not (path / "vocab.json").is_file() and (path / "tokenizer").is_dir():
        return "tokenizer"
    return None


def _load_tokenizer(name: str, subfolder: str | None, revision: str | None, cls=None):
    if cls is None:
        from transformers import CLIPTokenizer as cls

    kwargs = {"revision": revision} if revision else {}
    if subfolder:
        kwargs["subfolder"] = subfolder
    return _guard(name, lambda: cls.from_pretrained(name, **kwargs))


def _from_pretrained(cls, name: str, subfolder: str, revision, variant, dtype, device=None):
    """`cls.from_pretrained` for one component (read straight onto `device` when given); a
    missing variant falls back to full weights."""
    kwargs = dict(subfolder=subfolder, dtype=dtype, **({"device_map": {"": str(device)}} if device else {}))
    if revision:
        kwargs["revision"] = revision
    if is_local(name):
        component = Path(os.path.expanduser(name)) / subfolder
        if variant and not has_variant(component, variant):
            variant = None  # this component was saved without the variant; the others keep it
        variant = variant or _only_variant(component)
    if variant:
        try:
            return cls.from_pretrained(name, variant=variant, **kwargs)
        except (OSError, ValueError) as exc:
            logger.warning("%s/%s: no %s variant (%s); using the default weights",
                           name, subfolder, variant, _first_line(exc))
    return _guard(name, lambda: cls.from_pretrained(name, **kwargs))


def _guard(name: str, load):
    """Run `load()`; turn the loaders' errors about a user's model into one `ModelLoadError`."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return load()
    except ModelLoadError:
        raise
    except (OSError, ValueError, HfHubHTTPError) as exc:
        raise ModelLoadError(_load_failure_message(name, exc)) from exc


def _load_failure_message(name: str, exc: BaseException) -> str:
    if _is_gated(exc):
        return (f"{name} is a gated model: accept its licence on https://huggingface.co/{name} while logged in "
                "to the Hub, then log in here with a token of that account (the notebook's login cell, "
                "`huggingface-cli login` or HF_TOKEN).")
    if is_local(name):
        return (f"{name}: cannot load this model ({_first_line(exc)}). The folder is incomplete or "
                "was saved by an incompatible tool: copy or download it again.")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    why = "offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else \
        "check the spelling, your internet connection, and for gated models accept the licence " \
        "on huggingface.co and log in (huggingface-cli login or HF_TOKEN)"
    return (f"{name}: cannot load from the Hugging Face Hub: {why}. If it is meant to be a local "
            f"folder, that path does not exist. ({_first_line(exc)})")


def _is_gated(exc: BaseException | None) -> bool:
    """Whether the Hub refused a gated repository (Flux.1 [dev]) anywhere in `exc`'s chain."""
    from huggingface_hub.errors import GatedRepoError

    while exc is not None:
        if isinstance(exc, GatedRepoError) or "gated repo" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _load_single_file(path: str, dtype, config: str | None, original_config: str | None):
    """The family's `from_single_file` (SD or SDXL pipeline) with safety checks and a clear offline error."""
    file = Path(os.path.expanduser(path))
    _check_single_file(file)
    family = detect_family(str(file)).family
    config = single_file_config(config)
    if config and is_local(config):
        check_model_path(config, tuple(c for c in family.components if c not in ("vae", "unet")))
    kwargs: dict = dict(dtype=dtype, **_pipeline_kwargs(family))
    if config:
        kwargs["config"] = str(config)
    elif original_config:
        kwargs["original_config"] = str(original_config)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return pipeline_class(family).from_single_file(str(file), local_files_only=offline, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # diffusers raises many kinds here; all mean "cannot read this file"
        raise ModelLoadError(_single_file_message(file, config, offline, exc)) from exc


def _single_file_message(file: Path, config: str | None, offline: bool, exc: BaseException) -> str:
    msg = f"{file}: cannot load this checkpoint ({_first_line(exc)})."
    if not config:
        msg += (" A single file has weights but no configs: diffusers fetches them from the Hub, which "
                f"{'is off (HF_HUB_OFFLINE=1)' if offline else 'failed'}. Pass config=<a diffusers folder "
                f"of the same architecture> (or set {SINGLE_FILE_CONFIG_ENV}), or original_config=<its "
                ".yaml> (--original_config) for an SD 1.x/2.x checkpoint.")
    else:
        msg += f" Check that {config} has the same architecture (SD 1.x, 2.x or XL) as the file."
    return msg


def load_vae(vae_name_or_path: str, *, torch_dtype=None, base_model: str | None = None):
    """Load an `AutoencoderKL` from a Hub id, a VAE or pipeline folder, or a single file.

    E.g. `stabilityai/sd-vae-ft-mse`. A single VAE file takes its config from `base_model`
    when that is a local diffusers folder (no download), else from the Hub.
    """
    from diffusers import AutoencoderKL

    if is_local(vae_name_or_path):
        path = Path(os.path.expanduser(vae_name_or_path))
        if not path.exists():
            raise ModelLoadError(f"{path}: VAE path does not exist. Fix --pretrained_vae_name_or_path "
                                 "or give a Hub id like stabilityai/sd-vae-ft-mse.")
        if path.is_file():
            return _load_single_file_vae(path, torch_dtype, base_model)
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            return _guard(str(path), lambda: AutoencoderKL.from_pretrained(path, subfolder="vae",
                                                                           dtype=torch_dtype))
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a VAE folder (no config.json and no vae/ folder). Give a "
                                 "VAE folder, a model folder, a .safetensors file or a Hub id.")
    return _guard(vae_name_or_path, lambda: AutoencoderKL.from_pretrained(vae_name_or_path,
                                                                          dtype=torch_dtype))


def _load_single_file_vae(path: Path, dtype, base_model: str | None):
    from diffusers import AutoencoderKL

    _check_single_file(path)
    kwargs: dict = dict(dtype=dtype)
    base = Path(os.path.expanduser(base_model)) if base_model else None
    if base is not None and (base / "vae" / "config.json").is_file():
        kwargs.update(config=str(base), subfolder="vae")
    try:
        return AutoencoderKL.from_single_file(str(path), **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load this VAE file ({_first_line(exc)}). Use a "
                             "diffusers VAE folder or Hub id (e.g. stabilityai/sd-vae-ft-mse) instead.") from exc


def make_scheduler(name: str, config):
    """A diffusers scheduler of kind `name` (see `SCHEDULERS`) from a model's scheduler config.

    The model's `prediction_type`, betas and timestep settings are kept.
    """
    import diffusers

    key = scheduler_key(name)
    if key is None:
        raise ModelLoadError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}.")
    cls = getattr(diffusers, SCHEDULERS[key])
    extra = {"algorithm_type": "dpmsolver++"} if key == "dpm++" else {}
    return cls.from_config(config, **extra)


def load_pipeline(
    model_name_or_path: str,
    *,
    vae_name_or_path: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype=None,
    device=None,
    scheduler: str | None = None,
    config: str | None = None,
    original_config: str | None = None,
    quantize: str | None = None,
) -> StableDiffusionPipeline:
    """Load the model family's pipeline for generating images (safety checker off).

    A `StableDiffusionPipeline` for SD 1.x/2.x, a `StableDiffusionXLPipeline` for SDXL
    (see `detect_family`). Accepts what `load_sd_components` accepts, a training
    `checkpoint-<step>/` folder and a LoRA run's weights folder (see `load_checkpoint_pipeline`).
    `scheduler` picks a sampler by name
    ("ddim", "dpm++", "euler", "euler_a", "pndm", "unipc", "ddpm", ...), keeping the
    model's `prediction_type`; `None` keeps the model's own. The pipeline is moved to
    `device` when given; `torch_dtype` defaults to `inference_dtype(device)`. `quantize`
    ("nf4", "int8") loads the denoiser quantized, as a run on a quantized base made its samples.
    """
    import torch

    dtype = torch_dtype or (inference_dtype(device) if device else torch.float32)
    if is_checkpoint_folder(model_name_or_path) or is_lora_weights_folder(model_name_or_path):
        return load_checkpoint_pipeline(model_name_or_path, torch_dtype=dtype, device=device, scheduler=scheduler,
                                        quantize=quantize)
    model_name_or_path, revision, variant, family = _resolve_source(
        model_name_or_path, revision, variant, config=config, skip=("vae",) if vae_name_or_path else ())
    extra: dict = {}
    if quantize:
        denoiser = _class(f"diffusers.{family.denoiser_class}")
        extra[family.denoiser] = _guard(model_name_or_path, lambda: load_quantized(
            denoiser, model_name_or_path, quantize, dtype=dtype, device=pick_device(device),
            subfolder=family.denoiser, revision=revision, variant=variant))
    if vae_name_or_path:
        extra["vae"] = load_vae(vae_name_or_path, torch_dtype=dtype, base_model=model_name_or_path)
    local = is_local(model_name_or_path)
    path = os.path.expanduser(model_name_or_path) if local else model_name_or_path
    if local and Path(path).is_file():
        pipe = _load_single_file(path, dtype, config, original_config)
        if "vae" in extra:
            pipe.vae = extra["vae"]
    else:
        pipe = _pipeline_from_pretrained(pipeline_class(family), path, revision, variant, dtype,
                                         dict(_pipeline_kwargs(family), **extra))
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    if device:
        pipe = pipe.to(device)
    return pipe


def prompt_kwargs(pipe, prompt: str | list[str], negative_prompt: str | list[str] | None) -> dict:
    """The prompt, and the negative prompt where the pipeline takes one (Flux.2 [klein] does not:
    its guidance compares with the empty prompt), as keyword arguments for the pipeline call."""
    import inspect

    params = inspect.signature(pipe).parameters
    if "negative_prompt" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {"prompt": prompt, "negative_prompt": negative_prompt or None}
    if negative_prompt:
        logger.warning("%s takes no negative prompt: %r is not used", type(pipe).__name__, negative_prompt)
    return {"prompt": prompt}


def _pipeline_from_pretrained(cls, path: str, revision, variant, dtype, extra: dict):
    """`cls.from_pretrained` with `extra` keyword arguments; a missing variant falls back."""
    kwargs = dict(dtype=dtype, **extra)
    if revision:
        kwargs["revision"] = revision
    if variant:
        try:
            return cls.from_pretrained(path, variant=variant, **kwargs)
        except (OSError, ValueError) as exc:
            logger.warning("%s: no %s variant (%s); using the default weights", path, variant, _first_line(exc))
    return _guard(path, lambda: cls.from_pretrained(path, **kwargs))


# --------------------------------------------------------------------------- checkpoint folders


def is_checkpoint_folder(path: str | os.PathLike) -> bool:
    """True for a training `checkpoint-<step>/` folder (accelerate state, no `model_index.json`)."""
    folder = Path(os.path.expanduser(os.fspath(path)))
    return (folder / "optimizer.bin").is_file() and not (folder / "model_index.json").is_file()


def is_lora_weights_folder(path: str | os.PathLike) -> bool:
    """True for a LoRA run's weights folder (`pytorch_lora_weights.safetensors` and `args.json`
    naming the base model, no pipeline of its own)."""
    folder = Path(os.path.expanduser(os.fspath(path)))
    return ((folder / "pytorch_lora_weights.safetensors").is_file() and (folder / "args.json").is_file()
            and not (folder / "model_index.json").is_file())


def load_checkpoint_pipeline(checkpoint_dir: str | os.PathLike, *, torch_dtype=None, device=None,
                             scheduler: str | None = None, quantize: str | None = None) -> StableDiffusionPipeline:
    """A pipeline from a training checkpoint: the run's base model (named in the checkpoint's
    `args.json`, else in the newest weights folder beside it) with the checkpoint's trained
    `unet/`, `text_encoder/` and (SDXL) `text_encoder_2/`, or its LoRA adapters. The weights are
    the trained ones, not the EMA average (that is what the run's weights folders hold). A
    LoRA run's weights folder (`is_lora_weights_folder`) loads the same way.
    """
    import torch

    folder = Path(os.path.expanduser(os.fspath(checkpoint_dir)))
    args = _checkpoint_args(folder)
    dtype = torch_dtype or torch.float32
    pipe = load_pipeline(args["pretrained_model_name_or_path"],
                         vae_name_or_path=args.get("pretrained_vae_name_or_path"),
                         revision=args.get("revision"), variant=args.get("variant"), torch_dtype=dtype,
                         scheduler=scheduler, quantize=quantize)
    trained = [sub for sub, module in pipe.components.items()
               if (folder / sub / "config.json").is_file() and hasattr(module, "from_pretrained")]
    for sub in trained:  # the denoiser, and the text encoders that were trained
        setattr(pipe, sub, _guard(str(folder), lambda sub=sub: type(getattr(pipe, sub)).from_pretrained(
            folder / sub, dtype=dtype)))
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        pipe.load_lora_weights(str(folder))
    elif not trained:
        raise ModelLoadError(f"{folder}: this checkpoint holds no model folders or LoRA weights (an older "
                             "dbtools wrote it). Resume training from it and let it save, or use a weights folder.")
    return pipe.to(device) if device else pipe


def _checkpoint_args(folder: Path) -> dict:
    """The run settings saved with a checkpoint (or with the newest weights folder of its run)."""
    import json

    candidates = [folder / "args.json"] + sorted(
        (p / "args.json" for p in folder.parent.iterdir() if p.name.isdigit()),
        key=lambda f: int(f.parent.name), reverse=True)
    for f in candidates:
        if f.is_file():
            try:
                args = json.loads(f.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ModelLoadError(f"{f}: not valid JSON ({exc}). Restore it from the run's other folders.") from exc
            if isinstance(args, dict) and args.get("pretrained_model_name_or_path"):
                return args
    raise ModelLoadError(f"{folder}: a training checkpoint without args.json naming its base model. Give the "
                         "run's weights folder instead, or copy args.json from the run into the checkpoint.")
