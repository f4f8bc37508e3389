"""Pure text rules: caption <-> file name, prompt templates, sanitizing. No I/O here."""

from __future__ import annotations

import re
import unicodedata

from dbtools.core.errors import UserError

# Characters that cannot appear in a file name on Windows, macOS or Linux (plus '/').
_ILLEGAL = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
_WINDOWS_RESERVED = frozenset(
    {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
)
MAX_NAME_BYTES = 255

# Method 1 writes the caption alone; method 2 puts the instance prompt first (the token
# being taught), then the caption, then the class prompt.
TEMPLATE_CAPTION_ONLY = "{caption}"
TEMPLATE_WITH_PROMPTS = "{instance_prompt}, {caption}, {class_prompt}"
TEMPLATE_FIELDS = ("caption", "instance_prompt", "class_prompt")

_MRWHO_PREFIX = re.compile(r"^\d+@")
_DUPLICATE_MARK = re.compile(r"\s*\(\d+\)$")
_INDEX_SUFFIX = re.compile(r"_\d+$")
_REPEATED_COMMAS = re.compile(r"\s*,(\s*,)+")
_EDGE_COMMAS = re.compile(r"^\s*,\s*|\s*,\s*$")
_SPACE_BEFORE_COMMA = re.compile(r"\s+,")


def collapse_spaces(text: str) -> str:
    """Turn any run of whitespace into one space and strip the ends."""
    return " ".join(text.split())


def caption_from_filename(name: str) -> str:
    """The caption encoded in an image file name.

    Drops the extension, a leading `<digits>@` (mrwho/joepenna), a trailing duplicate
    marker ` (<digits>)`, a trailing auto-caption index `_<digits>`; turns remaining
    underscores into spaces and collapses whitespace. `red_car_3.png` -> `red car`.
    """
    stem = name.rsplit("/", 1)[-1]
    if "." in stem.lstrip("."):
        stem = stem[: stem.rfind(".")]
    # Each rule is guarded by a cheap test so 100,000 names stay fast; same results.
    if stem[:1].isdigit() and "@" in stem:
        stem = _MRWHO_PREFIX.sub("", stem)
    if stem.endswith(")"):
        stem = _DUPLICATE_MARK.sub("", stem)
    if "_" in stem:
        stem = _INDEX_SUFFIX.sub("", stem)
    if stem.endswith(")"):
        stem = _DUPLICATE_MARK.sub("", stem)
    return collapse_spaces(stem.replace("_", " "))


def template_problems(template: str) -> list[str]:
    """What is wrong with a prompt template (unknown or malformed fields), if anything."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        return [f"template {template!r} is malformed ({exc}); use {{caption}}, "
                "{instance_prompt}, {class_prompt} and write literal braces as {{ }}."]
    unknown = sorted({f for f in fields if f not in TEMPLATE_FIELDS})
    if unknown:
        return [f"template {template!r} has unknown field(s) {unknown}; allowed: "
                + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)]
    return []


def default_template(instance_prompt: str = "", class_prompt: str = "") -> str:
    """Method 1 (`{caption}`) without prompts; method 2 with an instance or class prompt."""
    return TEMPLATE_WITH_PROMPTS if (instance_prompt or class_prompt) else TEMPLATE_CAPTION_ONLY


def apply_template(template: str, caption: str, instance_prompt: str = "", class_prompt: str = "") -> str:
    """Fill `template`; empty parts vanish cleanly (no stray ', ' or doubled spaces)."""
    values = {"caption": caption.strip(), "instance_prompt": instance_prompt.strip(),
              "class_prompt": class_prompt.strip()}
    text = template.format(**values)
    if "," in text:
        text = _REPEATED_COMMAS.sub(",", text)  # ", ," left by an empty part
        text = _EDGE_COMMAS.sub("", text)
        text = _SPACE_BEFORE_COMMA.sub(",", text)
    return collapse_spaces(text)


def clean_caption(text: str) -> str:
    """A generated caption as one clean line: no control characters, single spaces."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    return collapse_spaces(text)


def safe_filename_stem(caption: str, suffix: str = "", max_bytes: int = MAX_NAME_BYTES) -> str:
    """A file-name stem from a caption that is safe on every OS.

    Removes path separators, `..`, control and Windows-illegal characters, trailing
    dots/spaces and reserved device names; trims so `stem + suffix` fits in `max_bytes`
    UTF-8 bytes without cutting a character in half. Never returns an empty string.
    """
    stem = _ILLEGAL.sub(" ", clean_caption(caption))
    stem = collapse_spaces(stem.replace("..", " ")).strip(" .")
    if stem.lower().split(".")[0] in _WINDOWS_RESERVED:
        stem = f"_{stem}"
    budget = max(1, max_bytes - len(suffix.encode("utf-8")))
    stem = stem.encode("utf-8")[:budget].decode("utf-8", errors="ignore").rstrip(" .")
    return stem or "untitled"


# --------------------------------------------------------------------------- caption formats
# The one table of where an image's caption lives. Caption-file formats name a file from
# the image's name: the whole name (`a.png` -> `a.png.txt`, read by `--read_prompts_from_txts`)
# or its stem (`a.png` -> `a.txt`, `a.caption`). Filename formats keep the caption in the
# image's own name (EveryDream: `<caption>_<i>.png`, mrwho/joepenna: `<i:05>@<caption>.png`).
CAPTION_FILE_FORMATS = {"sidecar": (True, ".txt"), "txt": (False, ".txt"), "caption": (False, ".caption")}
FILENAME_FORMATS = ("filename", "mrwho", "joepenna")
FORMAT_ALIASES = {"text": "txt", "stem": "txt"}
"""Other names of a format: EveryDream's `text`, the Omnitool's `--naming stem`."""


def caption_format(fmt: str) -> str:
    """`fmt` under its table name (aliases resolved); `UserError` for an unknown format."""
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in CAPTION_FILE_FORMATS and fmt not in FILENAME_FORMATS:
        known = [*CAPTION_FILE_FORMATS, *FILENAME_FORMATS, *FORMAT_ALIASES]
        raise UserError(f"unknown caption format {fmt!r}; use one of {', '.join(known)}.")
    return fmt


def caption_file_name(image_name: str, fmt: str = "sidecar") -> str | None:
    """The name of image `image_name`'s caption file in format `fmt`; None for a filename
    format (the image's name is its caption). `a.png` -> `a.png.txt` / `a.txt` / `a.caption`."""
    keep_extension, suffix = CAPTION_FILE_FORMATS.get(FORMAT_ALIASES.get(fmt, fmt), (None, ""))
    if keep_extension is None:
        caption_format(fmt)  # raises for an unknown format
        return None
    if keep_extension:
        return image_name + suffix
    dot = image_name.rfind(".")
    return (image_name[:dot] if dot > 0 else image_name) + suffix


def caption_candidates(image_name: str) -> list[str]:
    """The caption-file names that may hold an image's caption, in the order training
    looks for them: `<name>.txt`, `<stem>.txt`, `<stem>.caption`."""
    return [caption_file_name(image_name, fmt) for fmt in CAPTION_FILE_FORMATS]


def caption_image_name(caption: str, fmt: str, index: int, ext: str) -> str:
    """The image name that carries `caption` in filename format `fmt`, at most 255 bytes:
    `filename` -> `<caption>_<index><ext>`, `mrwho`/`joepenna` -> `<index:05>@<caption><ext>`."""
    if caption_format(fmt) == "filename":
        tail = f"_{index}{ext}"
        return safe_filename_stem(caption, tail) + tail
    if fmt not in FILENAME_FORMATS:
        raise ValueError(f"{fmt!r} keeps captions in files, not in image names")
    head = f"{index:05}@"
    return head + safe_filename_stem(caption, head + ext) + ext
