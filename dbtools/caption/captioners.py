"""Captioner families beyond BLIP: Florence-2, WD14-style taggers and instruction VLMs.

Every captioner offers what `dbtools.caption.autocaption.caption_files` needs, so all families
share batching, prefetch, output formats, the undo log and error handling:

- `kind`: the family name; `device`: where it runs (a `torch.device`);
- `preprocess`: a picklable callable, RGB PIL image -> one batch item (it runs in the
  decoding worker processes);
- `caption_batch(batch, cfg)`: captions for the stacked items of one batch.

The family is read from the model's files (`detect_family`), never from a flag:

- `blip` / `blip2` / `florence2`: the config's `model_type`;
- `tagger`: an ONNX file plus `selected_tags.csv` (SmilingWolf `wd-*-tagger` layout);
- `vlm`: any other config that transformers maps to `AutoModelForImageTextToText`
  (SmolVLM / Idefics3, Qwen2.5-VL, Qwen3-VL, ...), prompted through its chat template.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from dbtools.caption.config import CaptionError, generation_kwargs
from dbtools.dataset.captions import clean_caption

logger = logging.getLogger(__name__)

FLORENCE2_MODEL = "florence-community/Florence-2-large"
TAGGER_MODEL = "SmilingWolf/wd-vit-tagger-v3"
VLM_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
FLORENCE2_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
FLORENCE2_DEFAULT_TASK = "<DETAILED_CAPTION>"
VLM_DEFAULT_INSTRUCTION = "Describe this image in one sentence."
TAGS_FILE = "selected_tags.csv"
GENERAL, CHARACTER, RATING = 0, 4, 9
# Openings Florence-2 puts before nearly every description; they say nothing about the image.
BOILERPLATE = re.compile(
    r"^(?:the image (?:shows|is|depicts|features|contains)|this image (?:shows|is|depicts)|"
    r"in this image,? (?:we can see|there is|there are)|in the image,? (?:we can see|there is|there are))"
    r"\s+", re.IGNORECASE)


def _error(message: str):
    return CaptionError(message)


# ----------------------------------------------------------------------------- detection


def _local_or_hub_file(model: str, name: str) -> Path | None:
    """`name` inside folder `model`, or fetched from Hub repo `model`; None if absent."""
    folder = Path(model)
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model, name))
    except Exception:  # not a repo, no such file, offline: this is just not that family
        return None


def tagger_files(model: str) -> tuple[Path, Path] | None:
    """(ONNX model, selected_tags.csv) when `model` is a WD14-style tagger, else None."""
    tags = _local_or_hub_file(model, TAGS_FILE)
    if tags is None:
        return None
    folder = Path(model)
    if folder.is_dir():
        onnx = sorted(folder.glob("*.onnx"))
        return (onnx[0], tags) if onnx else None
    onnx = _local_or_hub_file(model, "model.onnx")
    return (onnx, tags) if onnx else None


def detect_family(model: str) -> str:
    """`blip`, `blip2`, `florence2`, `tagger` or `vlm` for a Hub id or local folder.

    Raises `CaptionError` naming the model and the families it could be when its files
    match none (read before any weights load).
    """
    if tagger_files(model) is not None:
        return "tagger"
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise _error(
            f"cannot load captioning model {model!r} ({exc}). Give a Hub id or a local folder "
            f"with config.json (BLIP, BLIP-2, Florence-2, an image-text-to-text VLM) or with "
            f"a .onnx file and {TAGS_FILE} (a WD14-style tagger).") from exc
    known = {"blip": "blip", "blip-2": "blip2", "florence2": "florence2"}
    if config.model_type in known:
        return known[config.model_type]
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "vlm"
    raise _error(
        f"{model!r} is a {config.model_type!r} model, not a captioner dbtools knows. Use BLIP / "
        f"BLIP-2 (Salesforce/blip-image-captioning-large), Florence-2 ({FLORENCE2_MODEL}), a "
        f"WD14-style tagger ({TAGGER_MODEL}) or an instruction VLM ({VLM_MODEL}).")


# ----------------------------------------------------------------------------- shared parts


class PixelValues:
    """Preprocess with a transformers image processor: image -> `pixel_values[0]`."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, image):
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def keep_image(image):
    """Preprocess for processors that need the image itself (VLMs): returns it."""
    return image


def _dtype_for(device):
    import torch

    return torch.float16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------- Florence-2


def strip_boilerplate(text: str) -> str:
    """Florence-2's caption without its stock opening ("The image shows ..."),
    first letter lower-cased as in the other families' captions."""
    text = clean_caption(text)
    stripped = BOILERPLATE.sub("", text)
    if stripped != text and stripped[:1].isupper() and not stripped[1:2].isupper():
        stripped = stripped[0].lower() + stripped[1:]
    return stripped


class Florence2Captioner:
    """Florence-2 through transformers' native classes; `--prompt` is its task token."""

    kind = "florence2"

    def __init__(self, model, processor, device, dtype):
        self.model, self.processor, self.device, self.dtype = model, processor, device, dtype
        self._prompts: dict[str, dict] = {}

    @property
    def preprocess(self):
        return PixelValues(self.processor.image_processor)

    def prompt_inputs(self, task: str, batch: int) -> dict:
        """Token ids of `task` with the image tokens, repeated `batch` times."""
        if task not in self._prompts:
            from PIL import Image

            # The processor inserts the image tokens only when it is given an image.
            enc = self.processor(images=[Image.new("RGB", (8, 8))], text=[task], return_tensors="pt")
            self._prompts[task] = {k: enc[k] for k in ("input_ids", "attention_mask")}
        return {k: v.repeat(batch, 1).to(self.device) for k, v in self._prompts[task].items()}

    def caption_batch(self, pixel_values, cfg) -> list[str]:
        import torch

        task = cfg.prompt or FLORENCE2_DEFAULT_TASK
        inputs = self.prompt_inputs(task, pixel_values.shape[0])
        pixels = pixel_values.to(self.device, self.dtype)
        with torch.inference_mode():
            out = self.model.generate(pixel_values=pixels, **inputs, **generation_kwargs(cfg, self.kind))
        # The caption tasks are plain text: decoding without special tokens is their
        # whole post-processing (the processor's parser is for boxes and polygons).
        return [strip_boilerplate(t) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def load_florence2(model: str, device, dtype=None) -> Florence2Captioner:
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    dtype = dtype or _dtype_for(device)
    net = Florence2ForConditionalGeneration.from_pretrained(model, dtype=dtype).to(device).eval()
    return Florence2Captioner(net, AutoProcessor.from_pretrained(model), device, dtype)


# ----------------------------------------------------------------------------- WD14 tagger


@dataclass(frozen=True)
class Tag:
    name: str
    category: int


@dataclass(frozen=True)
class TagRules:
    """How tag probabilities become a caption (`--threshold` ... `--exclude_tags`)."""

    threshold: float = 0.35
    character_threshold: float = 0.85
    include_ratings: bool = False
    exclude: frozenset[str] = frozenset()


def read_tags(path: str | Path) -> list[Tag]:
    """Tags of a `selected_tags.csv` (columns tag_id,name,category,count), in model order."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise _error(f"{path}: not a tagger tag list; it needs the columns tag_id,name,category,count.")
    return [Tag(r["name"], int(r["category"])) for r in rows]


def display_tag(name: str) -> str:
    """Underscores become spaces, except in emoticon-like tags (`^_^`, `o_o`, `>_<`):
    those have no run of two letters."""
    return name if not re.search(r"[A-Za-z]{2}", name) else name.replace("_", " ")


def parse_tag_list(text: str) -> frozenset[str]:
    """`--exclude_tags "long hair, solo"` -> normalised names (spaces, lower case)."""
    return frozenset(display_tag(t.strip()).lower() for t in text.split(",") if t.strip())


def select_tags(probs, tags: list[Tag], rules: TagRules) -> list[str]:
    """The tags to write for one image, most confident first: general tags at or above
    `threshold`, character tags at or above `character_threshold`, and with
    `include_ratings` the single most likely rating; excluded tags left out."""
    picked = []
    ratings = [(float(p), t) for p, t in zip(probs, tags) if t.category == RATING]
    if rules.include_ratings and ratings:
        picked.append(max(ratings, key=lambda pt: pt[0]))
    for p, tag in zip(probs, tags):
        limit = {GENERAL: rules.threshold, CHARACTER: rules.character_threshold}.get(tag.category)
        if limit is not None and float(p) >= limit:
            picked.append((float(p), tag))
    names = [display_tag(t.name) for _, t in sorted(picked, key=lambda pt: -pt[0])]
    return [n for n in names if n.lower() not in rules.exclude]


class SquareBGR:
    """Preprocess as WD14 taggers expect: pad to a white square, resize to `size`,
    float32 0-255 in BGR channel order, height x width x channels."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image):
        import numpy as np
        from PIL import Image

        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        if side != self.size:
            square = square.resize((self.size, self.size), Image.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()


class TaggerCaptioner:
    """A WD14-style ONNX tagger run with onnxruntime; captions are "tag, tag, ..."."""

    kind = "tagger"

    def __init__(self, session, tags: list[Tag], device):
        self.session, self.tags, self.device = session, tags, device
        shape = session.get_inputs()[0].shape  # (batch, height, width, 3)
        self.input_name, self.size = session.get_inputs()[0].name, int(shape[1])

    @property
    def preprocess(self):
        return SquareBGR(self.size)

    def probabilities(self, batch):
        return self.session.run(None, {self.input_name: batch})[0]

    def caption_batch(self, batch, cfg) -> list[str]:
        rules = TagRules(cfg.threshold, cfg.character_threshold, cfg.include_ratings,
                         parse_tag_list(cfg.exclude_tags))
        return [", ".join(select_tags(p, self.tags, rules)) for p in self.probabilities(batch)]


def load_tagger(model: str, device) -> TaggerCaptioner:
    """Open the tagger's ONNX model (CUDA provider when present, CPU otherwise)."""
    import onnxruntime as ort
    import torch

    onnx_path, tags_path = tagger_files(model)
    tags = read_tags(tags_path)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(onnx_path), providers=providers)
    outputs = session.get_outputs()[0].shape[-1]
    if isinstance(outputs, int) and outputs != len(tags):
        raise _error(f"{tags_path}: {len(tags)} tags, but {onnx_path.name} gives {outputs} scores; "
                     "use the tag list that came with the model.")
    on = torch.device("cuda" if providers[0].startswith("CUDA") else "cpu")
    return TaggerCaptioner(session, tags, on)


class TagsWithCaption:
    """A tagger and a captioner of another family in one pass: "caption, tag, tag"."""

    def __init__(self, tagger: TaggerCaptioner, captioner):
        self.tagger, self.captioner = tagger, captioner
        self.kind, self.device = f"tagger+{captioner.kind}", captioner.device

    @property
    def preprocess(self):
        return Both(self.tagger.preprocess, self.captioner.preprocess)

    def caption_batch(self, batch, cfg) -> list[str]:
        tag_batch, caption_batch = batch
        tags = self.tagger.caption_batch(tag_batch, cfg)
        captions = self.captioner.caption_batch(caption_batch, cfg)
        return [", ".join(part for part in (c, t) if part) for c, t in zip(captions, tags)]


class Both:
    """Two preprocessors applied to one image; the batch item is their pair."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, image):
        return self.first(image), self.second(image)


# ----------------------------------------------------------------------------- VLM


class VlmCaptioner:
    """An instruction-following VLM (`AutoModelForImageTextToText`) with its own chat
    template; `--prompt` is the instruction. Batches are left-padded."""

    kind = "vlm"

    def __init__(self, model, processor, device, dtype):
        self.model, self.processor, self.device, self.dtype = model, processor, device, dtype
        self._templates: dict[str, str] = {}

    preprocess = staticmethod(keep_image)

    def chat_text(self, instruction: str) -> str:
        """The model's chat template applied to one user turn: the image, then `instruction`."""
        if instruction not in self._templates:
            messages = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": instruction}]}]
            self._templates[instruction] = self.processor.apply_chat_template(
                messages, add_generation_prompt=True)
        return self._templates[instruction]

    def inputs(self, images, instruction: str) -> dict:
        text = self.chat_text(instruction)
        enc = self.processor(images=[[im] for im in images], text=[text] * len(images),
                             padding=True, padding_side="left", return_tensors="pt")
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in enc.items()}

    def caption_batch(self, images, cfg) -> list[str]:
        import torch

        inputs = self.inputs(images, cfg.prompt or VLM_DEFAULT_INSTRUCTION)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **generation_kwargs(cfg, self.kind))
        new = out[:, inputs["input_ids"].shape[1]:]
        return [clean_caption(t) for t in self.processor.batch_decode(new, skip_special_tokens=True)]


def load_vlm(model: str, device, dtype=None, quantize: str | None = None) -> VlmCaptioner:
    """Load an image-text-to-text model; `quantize` ("4bit"/"8bit", CUDA only) loads it
    through bitsandbytes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = dtype or _dtype_for(device)
    kwargs = {"dtype": dtype}
    if quantize:
        if device.type != "cuda":
            raise _error(f"--quantize {quantize} needs a CUDA GPU (bitsandbytes); leave it out on {device.type}.")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantize == "4bit", load_in_8bit=quantize == "8bit")
        kwargs["device_map"] = {"": device.index or 0}
    net = AutoModelForImageTextToText.from_pretrained(model, **kwargs)
    if not quantize:
        net = net.to(device)
    return VlmCaptioner(net.eval(), AutoProcessor.from_pretrained(model), device, dtype)
