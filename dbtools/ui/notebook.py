"""Helpers behind the notebook's cells: Colab/Drive, login, versions, one step per cell.

Every cell of `KaliYuga_DreamBooth.ipynb` is a few lines calling into this module, so the
logic is tested here rather than in the notebook. The later stages have modules of their
own, re-exported here so a cell needs only `from dbtools import notebook as nb`: the
caption editor (`dbtools.ui.editor`), inference and the Gradio UI (`dbtools.after.generate`),
safe cleanup (`dbtools.after.cleanup`), the training command and the runner that streams it
(`dbtools.ui.commands`) and the training cell's flag policy (`dbtools.ui.training_flags`).
Importing it has no side effects; ipywidgets, gradio, torch and diffusers are imported only
by the functions that use them. Everything works
in Colab, in local Jupyter and in a plain Python process (tests, CI).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbtools.after.cleanup import (
    CONFIRM_WORD,
    CleanupPlan,
    cleanup_plan,
    describe,
    keep_paths,
    run_cleanup,
    weights_fingerprint,
)
from dbtools.after.evaluate import PLOT_FILE, SUMMARY_FILE, save_plot, suggested_step
from dbtools.after.export import WHERE_IT_GOES, ExportConfig, is_lora_folder, run_export
from dbtools.after.generate import (
    DEFAULT_SCHEDULER,
    Generated,
    a1111_parameters,
    build_gradio_app,
    check_generation_args,
    generate,
    generate_images,
    generation_settings,
    launch_gradio,
    load_inference_pipeline,
    png_metadata,
    read_png_settings,
)
from dbtools.after.preview import run_preview
from dbtools.caption.autocaption import CaptionConfig, format_summary, load_for_config, run_caption
from dbtools.core.env import (
    REPORTED_PACKAGES,
    format_gpu_report,
    gpu_memory_gib,
    gpu_report,
    in_colab,
    quiet_third_party,
    versions_report,
)
from dbtools.core.errors import UserError
from dbtools.dataset.captions import TEMPLATE_CAPTION_ONLY
from dbtools.dataset.concepts import Concept, read_concepts
from dbtools.dataset.extract import ExtractConfig, run_extract
from dbtools.dataset.images import list_images
from dbtools.families.models import UnsupportedModelError, detect_family
from dbtools.families.profiles import (
    MEMORY_PROFILES,
    SD_DEFAULT,
    recommended_profile,
)
from dbtools.families.sd import SD_VAE
from dbtools.families.sdxl import SDXL_VAE
from dbtools.train.checkpoints import latest_weights, list_weights
from dbtools.train.metrics import METRICS_FILE, read_metrics
from dbtools.ui.commands import (
    PROJECT_DIR,
    CommandError,
    build_train_command,
    check_train_flags,
    flag_args,
    run_command,
)
from dbtools.ui.editor import (
    CACHE_DIR,
    CAPTION_FORMATS,
    CaptionEditor,
    caption_path,
    free_caption_name,
    read_caption,
    rename_no_overwrite,
)
from dbtools.ui.panel import run_live, show_tensorboard
from dbtools.ui.training_flags import (
    SEED_TRAIN_FLAGS,
    TrainingFlags,
    family_defaults,
    parse_extra_flags,
    shown_training_command,
    training_command,
    training_flags,
)

__all__ = [
    # environment
    "DRIVE_MOUNTPOINT", "DRIVE_ROOT", "REPORTED_PACKAGES", "enable_logging", "in_colab", "mount_drive",
    "resolve_output_dir", "gpu_report", "format_gpu_report", "versions_report", "hf_login",
    # weights
    "latest_weights", "weights_for_step",
    # training launch
    "flag_args", "build_train_command", "check_train_flags", "CommandError", "run_command",
    "SEED_TRAIN_FLAGS", "MEMORY_PROFILES", "SD_VAE", "SDXL_VAE", "TrainingFlags", "family_defaults",
    "parse_extra_flags", "training_flags", "training_command", "launch_training", "train_live", "recommended_profile",
    # cell steps
    "setup", "caption_step", "omnitool_step", "Session", "parse_steps", "review_step", "pick_weights",
    "suggested_weights", "score_curves", "tensorboard_step",
    "preview_step", "EXPORT_CHOICES", "export_step", "generate_step", "gradio_step", "cleanup_step",
    # dbtools.ui.editor
    "CACHE_DIR", "CAPTION_FORMATS", "CaptionEditor", "caption_path", "free_caption_name", "read_caption",
    "rename_no_overwrite",
    # dbtools.after.generate
    "DEFAULT_SCHEDULER", "Generated", "a1111_parameters", "build_gradio_app", "check_generation_args",
    "generate", "generate_images", "generation_settings", "launch_gradio", "load_inference_pipeline",
    "png_metadata", "read_png_settings",
    # dbtools.after.cleanup
    "CONFIRM_WORD", "CleanupPlan", "cleanup_plan", "describe", "run_cleanup",
]

logger = logging.getLogger(__name__)

DRIVE_MOUNTPOINT = "/content/drive"
DRIVE_ROOT = "/content/drive/MyDrive"


# =========================================================================== environment


class _CellHandler(logging.Handler):
    """Writes log lines to whatever `sys.stdout` is now (in a notebook: the running cell)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # logging must never break a cell
            self.handleError(record)


def enable_logging(level: int | str = logging.INFO) -> None:
    """Show dbtools' messages (progress notes, warnings, skipped steps) in the notebook.

    Safe to call more than once: one handler is added to the `dbtools` logger, and
    later calls only change the level.
    """
    log = logging.getLogger("dbtools")
    log.setLevel(level)
    if not any(isinstance(h, _CellHandler) for h in log.handlers):
        handler = _CellHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False  # no second copy through a root handler


def mount_drive(mountpoint: str = DRIVE_MOUNTPOINT) -> bool:
    """Mount Google Drive at `mountpoint` in Colab; return True when it is mounted.

    Outside Colab nothing is mounted: this logs why and returns False, so the same
    notebook cell runs in local Jupyter and in CI.
    """
    if not in_colab():
        logger.info("Not running in Colab: Google Drive is not mounted; local paths are used as given.")
        return False
    if os.path.isdir(os.path.join(mountpoint, "MyDrive")):
        logger.info("Google Drive is already mounted at %s", mountpoint)
        return True
    from google.colab import drive  # type: ignore[import-not-found]

    drive.mount(mountpoint)
    return True


def resolve_output_dir(
    path: str | os.PathLike,
    save_to_gdrive: bool,
    drive_root: str | os.PathLike = DRIVE_ROOT,
    *,
    colab: bool | None = None,
) -> Path:
    """Where outputs go: `path` on Google Drive when `save_to_gdrive`, else as given.

    Never adds the Drive prefix twice: a path already under `drive_root` or its mount
    point (`/content/drive`) is kept, and a relative path that starts with the tail of
    the prefix (`MyDrive/x`, `drive/MyDrive/x`) is completed rather than nested.
    Relative paths are joined to `drive_root`; other absolute paths are kept (with a
    warning, they are not on Drive). Trailing slashes, `~` and `.`/`..` are normalised.
    `save_to_gdrive` is ignored outside Colab (`colab` overrides the detection).
    """
    text = str(path).strip()
    if not text:
        raise UserError("The output folder is empty: set OUTPUT_DIR to a folder name.")
    p = Path(os.path.normpath(os.path.expanduser(text)))
    if not save_to_gdrive:
        return p
    if not (in_colab() if colab is None else colab):
        logger.warning("save_to_gdrive is on but this is not Colab: saving to %s on this machine.", p)
        return p
    root = Path(os.path.normpath(str(drive_root)))
    if p.is_absolute():
        if not (p == root.parent or root.parent in p.parents):
            logger.warning("%s is not on Google Drive (%s): files there are lost when the runtime ends.",
                           p, root)
        return p
    for k in range(1, len(root.parts)):
        tail = root.parts[k:]
        if p.parts[: len(tail)] == tail:
            return Path(*root.parts[:k], *p.parts)
    return root / p


LOGIN_HELP = (
    "Not logged in to the Hugging Face Hub; going on without a token. Public models (such as "
    "stable-diffusion-v1-5/stable-diffusion-v1-5) need no login. For gated models or pushing to the "
    "Hub: in Colab add the secret HF_TOKEN (key icon on the left) and run this cell again; elsewhere "
    "set the environment variable HF_TOKEN, or run `hf auth login` in a terminal (or "
    "`from huggingface_hub import login; login()` in a cell), then run this cell again.")


def hf_login(env_var: str = "HF_TOKEN") -> str:
    """Find a Hugging Face token without ever stopping the notebook; return where it came from.

    `"env"`: `$HF_TOKEN` is set and huggingface_hub uses it directly (nothing is stored).
    `"secret"`: Colab's `HF_TOKEN` secret, put into this process's `$HF_TOKEN` only.
    `"stored"`: a token from an earlier login. `"none"`: no token; a message says how to
    log in and that public models need none. Never asks for input, never writes or prints
    the token.
    """
    import huggingface_hub

    if os.environ.get(env_var, "").strip():
        logger.info("Using the Hugging Face token from $%s.", env_var)
        return "env"
    secret = _colab_secret(env_var)
    if secret:
        os.environ[env_var] = secret
        logger.info("Using the Hugging Face token from the Colab secret %s.", env_var)
        return "secret"
    if huggingface_hub.get_token():
        logger.info("Already logged in to the Hugging Face Hub.")
        return "stored"
    logger.info("%s", LOGIN_HELP)
    return "none"


def _colab_secret(name: str) -> str | None:
    """Colab's secret `name`, or None (not Colab, no such secret, or access not granted)."""
    if not in_colab():
        return None
    try:
        from google.colab import userdata  # type: ignore[import-not-found]

        return (userdata.get(name) or "").strip() or None
    except Exception:  # SecretNotFoundError, NotebookAccessError, ...: all mean "no secret"
        return None


# =========================================================================== weights


def weights_for_step(output_dir: str | os.PathLike, step: int) -> Path:
    """The complete weights folder saved at `step`; `UserError` lists the saved steps."""
    found = dict(list_weights(output_dir))
    if int(step) in found:
        return found[int(step)]
    have = ", ".join(str(s) for s in found) or "none yet"
    raise UserError(f"{Path(output_dir) / str(step)}: no complete weights saved at step {step}. "
                    f"Saved steps: {have}. Pick one of them, or leave the step empty for the latest.")




# =========================================================================== cell steps
# One function per notebook cell that does more than one call: the cell keeps only its
# form fields and this call, and the step is tested here.


def setup(install: bool = True, requirements: str | os.PathLike | None = None) -> bool:
    """The setup cell: dbtools' messages in the cell, `requirements.txt` installed (Colab
    only, on top of Colab's torch; never with `DBTOOLS_SKIP_INSTALL=1`), Colab's widget
    manager on, then the GPU and version reports. `requirements` defaults to the project's
    `requirements.txt`, wherever the notebook runs from. Returns whether this is Colab."""
    enable_logging()
    quiet_third_party()
    colab = in_colab()
    skip = os.environ.get("DBTOOLS_SKIP_INSTALL") == "1"
    why_not = ("not in Colab" if not colab else "DBTOOLS_SKIP_INSTALL=1" if skip
               else "install_requirements is off" if not install else None)
    if why_not is None:
        requirements = requirements or PROJECT_DIR / "requirements.txt"
        run_command([sys.executable, "-m", "pip", "install", "-q", "-r", os.fspath(requirements), "gradio>=5"],
                    check=True)
    else:
        logger.info("Not installing anything (%s): using this environment's packages.", why_not)
    logger.info("Project folder: %s", PROJECT_DIR)
    if colab:
        from google.colab import output

        output.enable_custom_widget_manager()  # the caption editor's widgets
    logger.info("%s\n\n%s", gpu_report(), versions_report())
    return colab


def caption_step(images_folder: str, captioned_folder: str, on_drive: bool, **options: Any) -> Path:
    """The auto-caption cell: caption `images_folder` into `captioned_folder` (empty: in
    place) with `CaptionConfig` `options`; an empty `images_folder` skips captioning.
    Returns the folder that holds the captioned images."""
    out = resolve_output_dir(captioned_folder, on_drive) if captioned_folder.strip() else None
    if not images_folder.strip():
        if out is None:
            raise UserError("Set images_folder (to caption it) or captioned_folder (already captioned) in "
                            "step 4.")
        logger.info("Auto-captioning skipped; the next steps use the images in %s.", out)
        return out
    images = resolve_output_dir(images_folder, on_drive)
    cfg = CaptionConfig(img_dir=images, out_dir=out or images, **_form_defaults(options))
    logger.info("%s", format_summary(run_caption(cfg, load_for_config(cfg))))
    return cfg.output_dir


# A form field left at its "use the default" value: 0 for the caption lengths, "" for text.
_FORM_DEFAULTS = {"min_length": 0, "max_length": 0, "prompt": "", "tags_with": ""}


def _form_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """`options` with form fields left at their default value turned into None."""
    return {k: None if k in _FORM_DEFAULTS and v == _FORM_DEFAULTS[k] else v for k, v in options.items()}


def omnitool_step(instance_data_dir: str, captioned_dir: Path, on_drive: bool, concepts_list: Path, *,
                  method: str, instance_prompt: str = "", class_prompt: str = "", class_data_dir: str = "",
                  template: str = "", overwrite: bool = False, concepts_file: str = ""):
    """The Omnitool cell: caption files for one concept (the form's fields; an empty
    `instance_data_dir` means `captioned_dir`) or for every concept in `concepts_file`,
    and `concepts_list.json`. Method 1 writes captions only unless `template` says
    otherwise. Returns the `ExtractSummary`."""
    if concepts_file.strip():
        concepts = read_concepts(resolve_output_dir(concepts_file, on_drive))
    else:
        class_dir = resolve_output_dir(class_data_dir, on_drive) if class_data_dir.strip() else None
        if class_dir:
            class_dir.mkdir(parents=True, exist_ok=True)  # training generates the class images into it
        instance = resolve_output_dir(instance_data_dir, on_drive) if instance_data_dir.strip() else captioned_dir
        if instance is None:
            raise UserError("No training images yet: fill in instance_data_dir in step 6 (the folder of your "
                            "captioned images), or run step 4 (Auto-caption) first.")
        concepts = [Concept(instance_data_dir=str(instance), instance_prompt=instance_prompt,
                            class_prompt=class_prompt, class_data_dir=str(class_dir or ""))]
    method_1 = method.startswith("Method 1") and not concepts_file.strip()
    if not method_1 and not concepts_file.strip():
        _check_method_2(concepts[0])
    chosen = template.strip() or (TEMPLATE_CAPTION_ONLY if method_1 else None)
    summary = run_extract(concepts, ExtractConfig(template=chosen, overwrite=overwrite,
                                                  write_concepts_list=str(concepts_list)))
    logger.info("%s", summary.describe())
    return summary


def _check_method_2(concept) -> None:
    """Method 2 asks for a class prompt: refuse an empty one when class images must be made
    from it (Method 1 is the way to train with an empty class prompt)."""
    folder = Path(concept.class_data_dir) if concept.class_data_dir else None
    if concept.class_prompt.strip() or (folder and folder.is_dir() and list_images(folder)):
        return
    raise UserError("Method 2 needs a class_prompt (e.g. 'a photo of a dog') to generate the class images "
                    f"for {concept.class_data_dir or 'class_data_dir'}. Fill in class_prompt, or choose "
                    "Method 1 (class images from an empty prompt, or your own images in the class folder).")


def launch_training(model: str, output_dir: str | os.PathLike, concepts_list: str | os.PathLike, *,
                    resume: bool = False, **options: Any) -> int:
    """The training cell: show the command (`training_command`, with this machine's GPU
    memory for `auto` and the fit check) and then its notes, run it with its output streamed
    into the cell. A problem the user can fix (the run's `error: ...` line) rises as one
    `UserError` in the notebook's words; any other failure raises `CommandError` with the last lines."""
    errors: list[str] = []
    try:
        return run_command(shown_training_command(model, output_dir, concepts_list, resume, options), check=True,
                           user_errors=errors)
    except CommandError:
        if not errors:  # not a message for the user: a bug, with its output
            raise
    raise UserError(notebook_words(errors[0]))


async def train_live(model: str, output_dir: str | os.PathLike, concepts_list: str | os.PathLike, *,
                     resume: bool = False, **options: Any) -> int:
    """The training cell with the live panel (`dbtools.ui.panel`): `launch_training`'s command,
    with progress, loss curve, samples, scores and a **Stop and save** button shown while it
    runs and the text log folded. Await it in the cell (the kernel then handles the button);
    interrupting the cell also stops and saves. A problem the user can fix rises as one
    `UserError` in the notebook's words, as in `launch_training`; any other failure raises
    `CommandError`."""
    argv = shown_training_command(model, output_dir, concepts_list, resume, options)
    errors: list[str] = []
    code, tail = await run_live(argv, output_dir, user_errors=errors)
    if code != 0 and errors:
        raise UserError(notebook_words(errors[0]))
    if code != 0:
        raise CommandError(argv, code, [line + "\n" for line in tail.rstrip("\n").split("\n")[-20:]])
    return code


def tensorboard_step(session: Session, show: bool = True) -> bool:
    """The TensorBoard cell: the run's TensorBoard (`<OUTPUT_DIR>/0/`) shown in the cell."""
    return show and show_tensorboard(session.output_dir)


# The training script's words for its flags and the other commands, and the training
# cell's words for them (in order: the longer phrases first).
NOTEBOOK_WORDS: tuple[tuple[str, str], ...] = (
    (r"with --resume_from_checkpoint latest", "by ticking `resume` in step 7 (Train)"),
    (r"\(--resume_from_checkpoint\)", "(`resume` in step 7)"),
    (r"--resume_from_checkpoint(?: latest)?", "`resume` (step 7)"),
    (r"add --overwrite_output_dir to", "tick `overwrite_output_dir` in step 7 to"),
    (r"--overwrite_output_dir", "`overwrite_output_dir` (step 7)"),
    (r"choose a new --output_dir", "choose a new OUTPUT_DIR in step 3 (Settings)"),
    (r"--output_dir\b", "OUTPUT_DIR"),
    (r"Write one \(python -m dbtools extract\)", "Run step 6 (Omnitool) again to write it"),
    (r"Write it with `python -m dbtools extract[^`]*`", "Run step 6 (Omnitool) to write it"),
    (r"`?python -m dbtools extract\b[^`.;)]*`?", "step 6 (Omnitool)"),
    (r"--(max_train_steps|learning_rate|extra_flags)\b", r"`\1` (step 7)"),
    (r"--(resolution|train_text_encoder|memory_profile|with_prior_preservation|num_class_images|"
     r"save_interval|save_sample_prompt)\b", r"`\1` (step 7a)"),
    (r"--concepts_list\b", "concepts_list.json (step 6)"),
    (r"--pretrained_model_name_or_path\b", "MODEL_NAME (step 3)"),
)


def notebook_words(message: str) -> str:
    """A training message with its command-line words (flags, `python -m dbtools ...`)
    replaced by the notebook's (the field and the step to change)."""
    for pattern, words in NOTEBOOK_WORDS:
        message = re.sub(pattern, words, message)
    return message


# =========================================================================== the session and later steps


@dataclass
class Session:
    """What the notebook's cells share, made once by the settings cell (`Session.start`)."""

    model: str
    output_dir: Path
    on_drive: bool = False
    captioned_dir: Path | None = None
    weights_dir: Path | None = None
    weights_id: str | None = None
    """`weights_fingerprint` of `weights_dir` when it was picked: a retrain changes it."""
    weights_step: str = ""
    """The step typed into the pick cell ("" when the cell chose the suggested or latest)."""
    generate_settings: dict[str, Any] = field(default_factory=dict)
    """The generate cell's last settings: the Gradio UI starts from them."""
    exported_from: list[Path] = field(default_factory=list)
    exported_fingerprints: dict[Path, str] = field(default_factory=dict)
    """Each exported folder's `weights_fingerprint` at export time: the cleanup cell counts an
    export only while the folder still holds those weights (not a later run's same step)."""
    app: Any = None
    caption_options: dict[str, Any] = field(default_factory=dict)
    """The caption options cell's fields, passed on by the auto-caption cell."""
    train_options: dict[str, Any] = field(default_factory=dict)
    """The training options cell's fields, passed on by the training cell."""
    family: Any = None
    """The base model's `families.Detected`, or None when it could not be read yet."""

    @classmethod
    def start(cls, model: str, output_dir: str, save_to_gdrive: bool) -> Session:
        """The settings cell: mount Drive when asked (Colab only), make the output folder,
        tell the model's family (the training cell adapts to it)."""
        on_drive = bool(save_to_gdrive) and mount_drive()  # outside Colab it says so, once
        out = resolve_output_dir(output_dir, on_drive)
        out.mkdir(parents=True, exist_ok=True)
        session = cls(model=model, output_dir=out, on_drive=on_drive, family=_try_detect(model))
        logger.info("Base model: %s%s\nOutput folder: %s", model, _family_line(session.family), out)
        return session

    @property
    def concepts_list(self) -> Path:
        return self.output_dir / "concepts_list.json"

    def path(self, text: str) -> Path:
        """A folder typed into a form field, on Drive when the session is."""
        return resolve_output_dir(text, self.on_drive)

    def __post_init__(self) -> None:
        if self.weights_dir is not None and self.weights_id is None:  # weights given, not picked by the cell
            self.weights_id = _weights_id(self.weights_dir)

    def use_weights(self, weights: Path, step: str = "") -> Path:
        """Remember `weights` as the picked weights (`step`: the step the user typed)."""
        self.weights_dir, self.weights_id, self.weights_step = weights, _weights_id(weights), step
        return weights

    def weights(self) -> Path:
        """The picked weights. When training wrote a new run into the output folder since they
        were picked, the new run's suggested or latest weights (said in one line), or, for a
        step the user typed, one line asking to pick again."""
        if self.weights_dir is None:
            raise UserError("No weights picked yet: run step 8 (Pick the weights) first.")
        if self.weights_current():
            return self.weights_dir
        if self.weights_step:
            raise UserError(f"The weights picked in step 8 ({self.weights_dir}) are not there any more: the "
                            "output folder holds a new training run. Run step 8 (Pick the weights) again.")
        weights = suggested_weights(self.output_dir) or latest_weights(self.output_dir)
        if weights is None:
            raise UserError(f"The weights picked in step 8 are gone and {self.output_dir} holds no complete "
                            "weights yet: let training finish (step 7), then run step 8 again.")
        logger.info("The output folder holds a new training run since step 8: using its weights in %s "
                    "(run step 8 to pick another step).", weights)
        return self.use_weights(weights)

    def weights_current(self, weights: Path | None = None, identity: str | None = None) -> bool:
        """True while `weights` (default: the picked weights) are the files they were when
        picked (`identity`, default: the picked identity)."""
        if weights is None:
            weights, identity = self.weights_dir, self.weights_id
        return weights is not None and identity is not None and _weights_id(weights) == identity


def _weights_id(folder: Path) -> str | None:
    """What tells one run's weights folder from the next run's at the same path: the same
    `weights_fingerprint` the cleanup cell ties exports to (None when there is no folder)."""
    return weights_fingerprint(folder) if Path(folder).is_dir() else None


def _try_detect(model: str):
    """The model's family, or None with a note (offline, a typo): the training cell asks again
    and then reports the problem."""
    try:
        return detect_family(model)
    except UnsupportedModelError:
        raise
    except UserError as exc:
        logger.info("Could not read the model's family yet (%s); the training cell will try again.",
                    str(exc).splitlines()[0])
        return None


def _family_line(detected) -> str:
    if detected is None:
        return ""
    line = f" ({detected.family.label}, {detected.resolution} px"
    pick = recommended_profile(detected.family.key, gpu_memory_gib())
    if pick != SD_DEFAULT:  # the original notebook's settings need no word
        line += f"; memory profile 'auto' picks {pick!r}, LoRA is recommended on 16 GB GPUs"
    return line + ")"


def _show(*paths: Path) -> None:
    """Show images in the running cell (nothing outside IPython)."""
    try:
        from IPython.display import Image, display
    except ImportError:
        return
    display(*[Image(filename=str(p)) for p in paths])


def parse_steps(text: str) -> list[int] | None:
    """`"500, 1000 1500"` -> `[500, 1000, 1500]`; empty -> None (all steps)."""
    parts = str(text or "").replace(",", " ").split()
    bad = [p for p in parts if not p.isdigit()]
    if bad:
        raise UserError(f"steps {text!r}: {', '.join(bad)} is not a step number. Write steps like "
                        "500, 1000 (or leave the field empty for all).")
    return [int(p) for p in parts] or None


def review_step(session: Session, review_folder: str, caption_format: str, images_per_page: int):
    """The review cell: show the caption editor for `review_folder` (empty: the captioned folder)."""
    folder = session.path(review_folder) if review_folder.strip() else session.captioned_dir
    if folder is None:
        raise UserError("No folder to review: set review_folder, or run the auto-caption cell first.")
    editor = CaptionEditor(folder, caption_format, images_per_page)
    try:
        from IPython.display import display

        display(editor.widget)
    except ImportError:
        pass
    return editor


def pick_weights(session: Session, step: str = "") -> Path:
    """The pick cell: the weights saved at `step`. Empty: the suggested best step when the
    saved steps were scored (`metrics-summary.json`) and its weights are still complete,
    else the latest complete weights. Shows the score curves (`metrics.png`) when there are scores."""
    steps = parse_steps(step)
    if steps and len(steps) > 1:
        raise UserError(f"weights_step {step!r}: give one step (or leave it empty for the suggested or latest).")
    if steps:
        weights = weights_for_step(session.output_dir, steps[0])
    else:
        weights = suggested_weights(session.output_dir) or latest_weights(session.output_dir)
        if weights is None:
            raise UserError(f"No complete weights in {session.output_dir} yet: run the training cell first "
                            "(or check OUTPUT_DIR).")
    session.use_weights(weights, step.strip())
    logger.info("Using the weights in %s", weights)
    curves = score_curves(session.output_dir)
    if curves is not None:
        _show(curves)
    return weights


def suggested_weights(output_dir: str | os.PathLike) -> Path | None:
    """The weights folder of the suggested best step, when it is still complete."""
    best = suggested_step(output_dir)
    if best is None:
        return None
    weights = dict(list_weights(output_dir)).get(best)
    if weights is None:
        logger.warning("The suggested step %d (%s) has no complete weights folder any more; using the latest.",
                       best, Path(output_dir) / SUMMARY_FILE)
        return None
    logger.info("Step %d is the suggested best step (%s says why); type another step to override.",
                best, Path(output_dir) / SUMMARY_FILE)
    return weights


def score_curves(output_dir: str | os.PathLike) -> Path | None:
    """`metrics.png`, the curves of the scores against steps (best step in red), drawn again
    when `metrics.jsonl` is newer; None when no step was scored."""
    metrics, png = Path(output_dir) / METRICS_FILE, Path(output_dir) / PLOT_FILE
    if not metrics.is_file():
        return None
    if not png.is_file() or png.stat().st_mtime < metrics.stat().st_mtime:
        records = read_metrics(output_dir)
        if not records:
            return None
        save_plot(output_dir, records, suggested_step(output_dir))
    return png


def preview_step(session: Session, steps: str = "", samples_per_step: int = 4, thumbnail_size: int = 256) -> Path:
    """The preview cell: save and show the grid of samples across steps."""
    png = run_preview(session.output_dir, steps=parse_steps(steps), max_samples=samples_per_step,
                      thumb=thumbnail_size)  # (it says where it saved the grid)
    _show(png)
    return png


EXPORT_CHOICES = ("auto", "single-file checkpoint", "LoRA file (kohya)")


def export_step(session: Session, export_format: str = "safetensors", fp16: bool = True, name: str = "",
                export_as: str = "auto") -> Path:
    """The export cell: the picked weights as one file in the output folder.

    `export_as`: "single-file checkpoint" (the whole model in the original layout; a LoRA
    run's adapters are fused into its base model), "LoRA file (kohya)" (a LoRA run's
    adapters as the LoRA file AUTOMATIC1111 and ComfyUI load), or "auto" (the LoRA file for
    a LoRA run, else the checkpoint).
    """
    if export_as not in EXPORT_CHOICES:
        raise UserError(f"export_as {export_as!r}: choose one of {', '.join(EXPORT_CHOICES)}.")
    weights = session.weights()
    lora = is_lora_folder(weights)
    as_lora = lora if export_as == "auto" else export_as.startswith("LoRA")
    if as_lora and not lora:
        raise UserError(f"{weights} holds a full model, not LoRA adapters: export it as a 'single-file "
                        "checkpoint' (a LoRA file comes from a run trained with --use_lora).")
    if as_lora and export_format != "safetensors":
        raise UserError("A LoRA file is written as .safetensors (AUTOMATIC1111 and ComfyUI do not read LoRA "
                        "pickles): set export_format to safetensors.")
    stem = name.strip() or f"{session.output_dir.name}-{weights.name}" + ("-lora" if as_lora else "")
    out = session.output_dir / f"{stem}.{export_format}"
    fingerprint = weights_fingerprint(weights)
    result = run_export(ExportConfig(weights, out, half=fp16, fuse_lora=lora and not as_lora))
    path = result.path
    session.exported_from.append(weights)  # the cleanup cell may now delete this folder
    session.exported_fingerprints[weights] = fingerprint
    logger.info("Wrote %s (%.2f GiB). %s", path, path.stat().st_size / 1024**3,
                WHERE_IT_GOES[result.kind])
    return path


def generate_step(session: Session, prompt: str, negative_prompt: str = "", num_images: int = 4,
                  guidance_scale: float = 7.5, steps: int = 30, width: int = 512, height: int = 512,
                  seed: int = -1, scheduler: str = DEFAULT_SCHEDULER) -> list[Path]:
    """The generate cell: images saved in `<output>/generated/` with their settings, and shown.
    A `width`/`height` of 0 is the model's own size (512 for SD 1.x, 1024 for SDXL). The
    settings are kept for the Gradio UI to start from."""
    session.generate_settings = dict(prompt=prompt, negative_prompt=negative_prompt, num_images=num_images,
                                     guidance_scale=guidance_scale, steps=steps, width=width, height=height,
                                     seed=seed, scheduler=scheduler)
    paths = generate_images(session.weights(), prompt, negative_prompt, num_images, guidance_scale, steps,
                            height or None, width or None, seed, None if scheduler == DEFAULT_SCHEDULER else scheduler,
                            out_dir=session.output_dir / "generated")
    logger.info("%s", "\n".join(map(str, paths)))
    _show(*paths)
    return paths


def gradio_step(session: Session, save_images: bool = True, auth: str = ""):
    """The Gradio cell: replace the session's running UI with one for the picked weights,
    starting from the generate cell's settings. When training writes a new run into the
    output folder, the UI refuses to generate from the old model and says to run this cell again."""
    if session.app is not None:
        session.app.close()  # one UI at a time; frees its model
        session.app = None
    weights = session.weights()
    identity = session.weights_id

    def check() -> None:
        if not session.weights_current(weights, identity):
            raise UserError("The output folder holds a new training run since this UI started: run step 12 "
                            "(Gradio UI) again to load it (step 8 picks another step).")

    session.app = build_gradio_app(weights, out_dir=session.output_dir / "gradio" if save_images else None,
                                   defaults=session.generate_settings, check=check)
    return launch_gradio(session.app, auth=auth)


def _still_exported(session: Session) -> list[Path]:
    """The exported folders that still hold the weights that were exported (a run trained
    into the same folder since then wrote new, unexported weights there)."""
    same = []
    for folder in dict.fromkeys(session.exported_from):
        if folder.is_dir() and weights_fingerprint(folder) == session.exported_fingerprints.get(folder):
            same.append(folder)
        elif folder.is_dir():
            logger.info("%s holds other weights than the ones exported from it (a newer run?): "
                        "they count as not exported.", folder)
    return same


def cleanup_step(session: Session, also_keep_steps: str = "", delete_unexported: bool = False,
                 delete_checkpoints: bool = False, confirm: str = "") -> list[Path]:
    """The cleanup cell: show the plan; delete only when `confirm` is the confirm word."""
    keep = keep_paths(session.output_dir, [also_keep_steps or ""], "also_keep_steps")
    if session.weights_dir is not None:
        keep.append(session.weights_dir)
    plan = cleanup_plan(session.output_dir, keep=keep, exported=_still_exported(session),
                        delete_checkpoints=delete_checkpoints, delete_unexported=delete_unexported)
    logger.info("%s", describe(plan))
    deleted = run_cleanup(plan, confirm)
    if deleted:
        logger.info("Deleted %d folder(s): %s", len(deleted), ", ".join(p.name for p in deleted))
    return deleted
