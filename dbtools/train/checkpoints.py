"""The training output folder: which step folders exist, which are complete, which go.

Layout (as in Shivam's script): `<output_dir>/<step>/` is a weights folder (a diffusers
pipeline, or in LoRA mode `pytorch_lora_weights.safetensors`); accelerate state for
resuming goes to `<output_dir>/checkpoint-<step>/`. Every folder is built under a
temporary `.tmp-` name and renamed when complete, so the functions here only ever
return complete folders.

A `checkpoint-<step>/` folder holds, as diffusers' script writes it:

- `unet/` and (when trained) `text_encoder/`: diffusers/transformers model folders, so
  `UNet2DConditionModel.from_pretrained(".../checkpoint-N/unet")` works (LoRA runs keep
  accelerate's `model*.safetensors` and add the adapters as `pytorch_lora_weights.safetensors`);
- `unet_ema/` with `--use_ema`: the EMA weights (safetensors) and its counters (JSON);
- `optimizer.bin`, `scheduler.bin` (and `scaler.pt` under fp16): accelerate's files,
  read back with `torch.load(weights_only=True)`;
- `args.json`: the run's settings (no secrets), so the folder can be loaded as a model.

Nothing in it is unpickled with code execution: no custom pickles, no RNG pickles
(batches, noise and timesteps are functions of the seed and the micro-batch index).
`check_checkpoint_files` refuses a folder holding a file that would need it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from dbtools.core.atomic import TMP_PREFIX, atomic_dir, atomic_write_text, is_temporary, restore_interrupted_swaps
from dbtools.core.errors import UserError

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
RUN_FILES_DIR = "0"
"""Shivam's `<output_dir>/0/`: the run's own files (TensorBoard logs, progress.json), never
weights. It sorts before every step, so the original notebook's
`natsorted(glob(OUTPUT_DIR/*))[-1]` still names the newest weights folder."""
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
SINGLE_FILE_NAME = "model.safetensors"
UI_LORA_SUFFIX = "-lora.safetensors"
"""How the kohya-style LoRA file in a LoRA step folder ends (see `ui_lora_name`)."""
ARGS_FILE = "args.json"
EMA_FOLDER = "unet_ema"
EMA_WEIGHTS = "diffusion_pytorch_model.safetensors"
EMA_STATE = "ema_state.json"

# Files accelerate's `load_state` reads with `torch.load(weights_only=True)`.
_TORCH_STATE = re.compile(r"^((optimizer|scheduler|sampler|dl_state_dict|pytorch_model|model)(_\d+)?\.bin"
                          r"|scaler\.pt|random_states_\d+\.pkl)$")
# accelerate unpickles these with `weights_only=False`: loading one can run any code.
_CUSTOM_STATE = re.compile(r"^custom_checkpoint_\d+\.pkl$")


class CheckpointError(UserError):
    """A checkpoint folder that cannot (or must not) be resumed from."""


def step_folders(output_dir: str | os.PathLike, prefix: str = "") -> list[tuple[int, Path]]:
    """Complete `<prefix><step>` folders in `output_dir`, sorted by step (temporary ones skipped)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        rest = p.name[len(prefix):]
        if p.is_dir() and p.name.startswith(prefix) and rest.isdigit() and not is_temporary(p):
            found.append((int(rest), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete `checkpoint-<step>` folder in `output_dir`, or None."""
    found = step_folders(output_dir, CHECKPOINT_PREFIX)
    return found[-1][1] if found else None


def ui_lora_name(output_name: str, step: int) -> str:
    """`<output name>-<step>-lora.safetensors`: the LoRA file for AUTOMATIC1111, Forge and ComfyUI
    that every LoRA step folder holds beside diffusers' `pytorch_lora_weights.safetensors`."""
    safe = re.sub(r'[<>:"/\\|?*\x00-\x1f]', "_", output_name).strip(" .") or "lora"
    return f"{safe}-{step}{UI_LORA_SUFFIX}"


def ui_lora_file(folder: Path) -> Path | None:
    """The UI LoRA file of a LoRA step folder (see `ui_lora_name`), or None."""
    found = sorted(p for p in Path(folder).glob(f"*{UI_LORA_SUFFIX}") if p.is_file())
    return found[0] if found else None


def is_weights_folder(path: Path) -> bool:
    """True for a saved weights folder: a diffusers pipeline or a LoRA adapter."""
    return (path / "model_index.json").is_file() or (path / LORA_WEIGHTS).is_file()


def list_weights(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every complete `<output_dir>/<step>/` weights folder, sorted by step."""
    return [(s, p) for s, p in step_folders(output_dir) if is_weights_folder(p)]


def holds_training_run(folder: str | os.PathLike, subfolders: list[str] | None = None) -> bool:
    """True when `folder` holds a training run of ours: a `checkpoint-<step>/`, a `<step>/`
    with `args.json` or with weights and `samples/`, or weights and `args.json` in the folder
    itself (diffusers layout). `subfolders`: its sub-folder names, when already listed."""
    root = Path(folder)
    if subfolders is None:
        subfolders = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    for name in subfolders:
        step = root / name
        if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", name) or name.isdigit() and (
                (step / ARGS_FILE).is_file() or (step / "samples").is_dir() and is_weights_folder(step)):
            return True
    return (root / ARGS_FILE).is_file() and is_weights_folder(root)


def training_runs_under(root: str | os.PathLike, skip_dir: Callable[[str], bool] = lambda name: False) -> list[Path]:
    """The folders strictly under `root` that hold a training run (`holds_training_run`),
    outermost only; links to folders are not followed, `skip_dir(name)` folders not entered."""
    found = []
    for dirpath, dirs, _ in os.walk(root):
        dirs[:] = [d for d in dirs if not skip_dir(d)]
        if dirpath != os.fspath(root) and holds_training_run(dirpath, dirs):
            found.append(Path(dirpath))
            dirs[:] = []
    return found


def latest_weights(output_dir: str | os.PathLike) -> Path | None:
    """The complete weights folder with the highest step (never a half-written one), or None.

    Half-written saves (`.tmp-*` folders, folders without `model_index.json` or LoRA
    weights) are skipped.
    """
    found = list_weights(output_dir)
    return found[-1][1] if found else None


def checkpoints_to_remove(output_dir: str | os.PathLike, limit: int | None) -> list[Path]:
    """Oldest complete checkpoints beyond `limit` (None keeps all)."""
    found = step_folders(output_dir, CHECKPOINT_PREFIX)
    if limit is None or len(found) <= limit:
        return []
    return [p for _, p in found[: len(found) - limit]]


def resume_path(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint to resume from: 'latest' or a path (as given, or inside `output_dir`).

    None when nothing is asked for, or when no complete checkpoint matches.
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        return latest_checkpoint(output_dir)
    for candidate in (Path(resume_from_checkpoint), Path(output_dir) / Path(resume_from_checkpoint).name):
        if candidate.is_dir() and not is_temporary(candidate):
            return candidate
    return None


def checkpoint_step(path: Path) -> int:
    """The step encoded in a `checkpoint-<step>` folder name."""
    return int(path.name[len(CHECKPOINT_PREFIX):])


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Delete half-written folders left by a killed run (`.tmp-<step>-*`, `.tmp-checkpoint-*`).

    A `.tmp-old-<name>` whose `<name>` is missing is the only complete copy left by an
    interrupted folder swap: it is restored first, never deleted.
    """
    root = Path(output_dir)
    restore_interrupted_swaps(root)
    stale = [p for p in root.glob(f"{TMP_PREFIX}*") if p.is_dir()
             and re.match(rf"{re.escape(TMP_PREFIX)}(old-)?({CHECKPOINT_PREFIX})?\d+", p.name)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def write_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, total_limit: int | None,
                     args: dict | None = None) -> Path:
    """Accelerate state in `<output_dir>/checkpoint-<step>/`, atomically; then remove the
    oldest checkpoints beyond `total_limit` (only once the new one is complete).

    The models go in through the hooks of `register_state_hooks`; accelerate's RNG pickles
    are left out (resume does not need them); `args` is written as `args.json`.
    """
    target = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    with atomic_dir(target) as tmp:
        accelerator.save_state(str(tmp))
        for rng in tmp.glob("random_states_*.pkl"):
            rng.unlink()
        if args is not None:
            atomic_write_text(tmp / ARGS_FILE, json.dumps(args, indent=2))
    for old in checkpoints_to_remove(output_dir, total_limit):
        logger.info("removing old checkpoint %s", old)
        shutil.rmtree(old)
    logger.info("checkpoint saved at %s", target)
    return target


# --------------------------------------------------------------------------- resume checks


def resume_problems(output_dir: str | os.PathLike, resume_from_checkpoint: str | None, *,
                    lora: bool | None = None, text_encoder: bool = False, ema: bool = False) -> list[str]:
    """What stops resuming from `resume_from_checkpoint`, checked before any model loads.

    A weights folder given as a checkpoint is named as such, with the checkpoints that
    exist; a checkpoint holding a file whose loading could run code is refused (see
    `check_checkpoint_files`); one with a file cut short, unreadable or (given `lora`, and
    the run's `text_encoder` and `ema`) missing is named damaged or incomplete, with the
    earlier checkpoints to resume from instead.
    """
    if not resume_from_checkpoint:
        return []
    given = Path(resume_from_checkpoint)
    if resume_from_checkpoint != "latest" and given.is_dir() and is_weights_folder(given):
        return [_weights_folder_message(given, output_dir, resume_from_checkpoint)]
    path = resume_path(output_dir, resume_from_checkpoint)
    if path is None:
        return []
    if is_weights_folder(path) and not path.name.startswith(CHECKPOINT_PREFIX):
        return [_weights_folder_message(path, output_dir, resume_from_checkpoint)]
    problems = unsafe_checkpoint_files(path, damaged=True)
    if lora is not None:
        problems += [f"{path / name}: missing; {_DAMAGED}." for name in
                     missing_checkpoint_files(path, lora=lora, text_encoder=text_encoder, ema=ema)]
    if any(_DAMAGED in p for p in problems):
        problems.append(_damaged_advice(path, output_dir))
    return problems


def missing_checkpoint_files(folder: Path, *, lora: bool, text_encoder: bool, ema: bool = False) -> list[str]:
    """The files resume reads that `folder` lacks, by their names in it (`unet/*.safetensors`
    for the weights' shards), for a run that trains LoRA adapters or full weights, the text
    encoder or not, with an EMA or not."""
    need = ["optimizer.bin", "scheduler.bin"]
    if lora:
        need += ["model.safetensors"] + (["model_1.safetensors"] if text_encoder else [])
    else:
        need += [f"{sub}/{name}" for sub in ["unet"] + (["text_encoder"] if text_encoder else [])
                 for name in ("config.json", "*.safetensors")]
    if ema:
        need += [f"{EMA_FOLDER}/{EMA_WEIGHTS}", f"{EMA_FOLDER}/{EMA_STATE}"]
    return [name for name in need if not any(p.is_file() for p in folder.glob(name))]


def _damaged_advice(path: Path, output_dir: str | os.PathLike) -> str:
    earlier = [p for step, p in step_folders(path.parent, CHECKPOINT_PREFIX)
               if path.name.startswith(CHECKPOINT_PREFIX) and step < checkpoint_step(path)]
    older = (f"resume from an earlier checkpoint (--resume_from_checkpoint {earlier[-1]}; all: "
             f"{', '.join(p.name for p in earlier)})" if earlier else "resume from an earlier checkpoint if you "
             "have one")
    return (f"{path} is damaged or incomplete (a save that was interrupted, or a copy or Drive sync that has not "
            f"finished): {older}, wait for the copy to finish, or start a new run in {output_dir} with "
            "--overwrite_output_dir (the old run is moved aside).")


def _weights_folder_message(path: Path, output_dir: str | os.PathLike, given: str) -> str:
    found = step_folders(output_dir, CHECKPOINT_PREFIX) or step_folders(path.parent, CHECKPOINT_PREFIX)
    names = ", ".join(str(p) for _, p in found)
    where = (f"Checkpoints that exist: {names}; pass one of them, or `latest`." if found else
             f"There are no checkpoint-<step> folders in {output_dir}: training saves them every "
             "--checkpointing_steps steps; start a new run, or load these weights as the base model "
             "with --pretrained_model_name_or_path.")
    return (f"--resume_from_checkpoint {given}: {path} is a weights folder (a saved model), not a training "
            f"checkpoint; resuming needs a checkpoint-<step> folder with the optimizer state. {where}")


def unsafe_checkpoint_files(folder: Path, damaged: bool = False) -> list[str]:
    """One line per file in `folder` whose loading could run code or that is not what its name
    says; with `damaged`, unreadable `.safetensors` files too (they cannot run code)."""
    problems = []
    for f in sorted(folder.rglob("*")):
        why = _file_problem(f, damaged) if f.is_file() else None
        if why:
            problems.append(f"{f}: {why}")
    return problems


def check_checkpoint_files(folder: Path) -> None:
    """Raise `CheckpointError` naming each file of `folder` that resume must not or cannot load."""
    problems = unsafe_checkpoint_files(folder, damaged=True)
    if problems:
        raise CheckpointError("\n".join([f"Refusing to resume from {folder}:", *[f"- {p}" for p in problems]]))


_DAMAGED = "damaged or incomplete"
_REFUSED = ("refused: loading it could run code on this machine. dbtools never writes such a file; if you did "
            "not put it there, the folder may have been tampered with. Resume from a checkpoint you made, or "
            "delete this file")


def _file_problem(f: Path, damaged: bool) -> str | None:
    if f.suffix == ".safetensors":
        return _safetensors_problem(f) if damaged else None
    if f.suffix == ".json":
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return f"not valid JSON: {_DAMAGED}."
        return None
    if _CUSTOM_STATE.match(f.name):
        return f"{_REFUSED} (it is a pickle of Python objects)."
    if _TORCH_STATE.match(f.name):
        return _torch_state_problem(f)
    return None  # nothing reads other files


def _safetensors_problem(f: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(f), framework="pt") as fh:
            fh.keys()
    except (SafetensorError, OSError, ValueError):
        return f"not a valid .safetensors file: {_DAMAGED}."
    return None


def _torch_state_problem(f: Path) -> str | None:
    """Statically list the pickle's imports (nothing is unpickled); refuse any outside the safe list.

    A file that is neither a pickle nor a complete zip archive (empty, cut short, zero-filled)
    cannot run code: it is damaged, not hostile."""
    import zipfile

    import torch
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    with open(f, "rb") as fh:
        head = fh.read(2)
    if not zipfile.is_zipfile(f):
        if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a bare pickle (protocol 2-5)
            return f"{_REFUSED} (it is a pickle of Python objects, not a PyTorch state file)."
        return (f"{'empty' if not head else 'cut short or not a complete PyTorch state file'} "
                f"({f.stat().st_size:,} bytes): {_DAMAGED}.")
    try:
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
    except pickle.UnpicklingError:  # opcodes the scan cannot follow: a pickle never trusted unread
        return f"{_REFUSED} (its pickle cannot be checked without running it)."
    except Exception:  # a damaged or cut-short archive
        return f"not a readable PyTorch state file: {_DAMAGED}."
    if unsafe:
        return f"{_REFUSED} (it imports {', '.join(sorted(unsafe))})."
    return None


# --------------------------------------------------------------------------- model folders


def register_state_hooks(accelerator, ema=None, save_adapters: Callable[[Path], None] | None = None,
                         denoiser: str = "unet") -> None:
    """Make `accelerator.save_state`/`load_state` write and read the models as diffusers does.

    Full weights go to `<denoiser>/` (`unet/` for SD) and `text_encoder/` (folders that `from_pretrained`
    loads); of a LoRA model only the trained tensors (the adapters) go to accelerate's
    `model*.safetensors`, never the frozen base (about 5 GB for SDXL's UNet), and
    `save_adapters(folder)` adds `pytorch_lora_weights.safetensors`. With `ema` (main
    process only), its weights and counters go to `unet_ema/`; on load they are moved to
    the accelerator's device.
    """
    def save_hook(models, weights, output_dir):
        out = Path(output_dir)
        named = _model_names(accelerator, models, denoiser)
        if named is None:
            for i, model in enumerate(models):
                trained = {n for n, p in model.named_parameters() if p.requires_grad}
                weights[i] = {k: v for k, v in weights[i].items() if k in trained}
            if save_adapters is not None:
                save_adapters(out)
        else:
            for i in reversed(range(len(models))):
                accelerator.unwrap_model(models[i]).save_pretrained(out / named[i], safe_serialization=True)
                weights.pop(i)
        if ema is not None:
            save_ema(ema, _unet_names(accelerator, models), out / EMA_FOLDER)

    def load_hook(models, input_dir):
        folder = Path(input_dir)
        named = _model_names(accelerator, models, denoiser)
        if ema is not None and (folder / EMA_FOLDER).is_dir():
            load_ema(ema, _unet_names(accelerator, models), folder / EMA_FOLDER, accelerator.device)
        if named is None:
            for i in reversed(range(len(models))):
                _load_trained_tensors(models[i], folder / f"model{f'_{i}' if i else ''}.safetensors")
                models.pop(i)
        present = [] if named is None else [n for n in named if (folder / n).is_dir()]
        if named is not None and present:
            if len(present) != len(named):
                missing = ", ".join(sorted(set(named) - set(present)))
                raise CheckpointError(f"{folder}: no {missing}/ folder, but this run trains it. Resume with the "
                                      "same --train_text_encoder setting as the run that wrote the checkpoint.")
            for i in reversed(range(len(models))):
                load_model_folder(accelerator.unwrap_model(models[i]), folder / named[i])
                models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _load_trained_tensors(model, file: Path) -> None:
    """A LoRA model's trained tensors from accelerate's `model*.safetensors` (older checkpoints
    hold the frozen base too, which is the same as the loaded one)."""
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"{file.parent}: no {file.name}. The checkpoint is incomplete: resume from another one.")
    result = model.load_state_dict(load_file(str(file)), strict=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trained & set(result.missing_keys))
    if result.unexpected_keys or missing:
        raise CheckpointError(f"{file}: holds other weights than this run trains ({len(missing)} missing, "
                              f"{len(result.unexpected_keys)} unknown). Resume with the same --use_lora, --lora_rank "
                              "and --train_text_encoder settings as the run that wrote the checkpoint.")


def _model_names(accelerator, models, denoiser: str) -> list[str] | None:
    """Folder names for the prepared models (the denoiser's component name, `text_encoder`,
    `text_encoder_2`), or None for LoRA."""
    names, encoders = [], 0
    for m in models:
        m = accelerator.unwrap_model(m)
        if any("lora_" in n for n, _ in m.named_parameters()):
            return None
        if type(m).__module__.startswith("diffusers"):
            names.append(denoiser)
        else:
            encoders += 1
            names.append("text_encoder" if encoders == 1 else f"text_encoder_{encoders}")
    return names


def _unet_names(accelerator, models) -> list[str]:
    for m in models:
        m = accelerator.unwrap_model(m)
        if type(m).__module__.startswith("diffusers"):
            return [n for n, _ in m.named_parameters()]
    raise RuntimeError("the EMA needs the UNet among the prepared models")


def load_model_folder(model, folder: Path) -> None:
    """Load the weights of a `save_pretrained` folder (one file or shards) into `model`, exactly."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors weights. The checkpoint is incomplete: "
                              "resume from another one.")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    model.load_state_dict(state, strict=True)


def save_ema(ema, names: list[str], folder: Path) -> None:
    """The EMA's weights (safetensors, by UNet parameter name) and counters (JSON) in `folder`."""
    from safetensors.torch import save_file

    if len(names) != len(ema.shadow_params):
        raise RuntimeError(f"EMA holds {len(ema.shadow_params)} tensors for {len(names)} UNet parameters")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().contiguous() for n, p in zip(names, ema.shadow_params, strict=True)}
    save_file(tensors, str(folder / EMA_WEIGHTS))
    state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    atomic_write_text(folder / EMA_STATE, json.dumps({**state, "names": names}, indent=2))


def load_ema(ema, names: list[str], folder: Path, device) -> None:
    """Restore an EMA written by `save_ema`, its tensors on `device` (where training runs)."""
    from safetensors.torch import load_file

    state = json.loads((folder / EMA_STATE).read_text(encoding="utf-8"))
    saved = state.pop("names")
    if saved != names:
        raise CheckpointError(f"{folder}: the EMA weights are for another UNet. Resume with the model "
                              "the checkpoint was trained from.")
    tensors = load_file(str(folder / EMA_WEIGHTS))
    ema.load_state_dict({**state, "shadow_params": [tensors[n] for n in names]})
    # Loaded tensors are on the CPU; `ema.step` mixes them with the training device's.
    ema.to(device)
