"""Concepts and `concepts_list.json` (Shivam Shrirao's format).

The file is a JSON list of objects with `instance_prompt`, `class_prompt`,
`instance_data_dir` and `class_data_dir`. We also read and write an optional
`prompt_template` (how a per-image caption combines with the prompts at training
time); tools that do not know it ignore it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dbtools.core.atomic import atomic_write_text
from dbtools.core.errors import UserError
from dbtools.dataset.captions import template_problems
from dbtools.dataset.images import has_images

SHIVAM_KEYS = ("instance_prompt", "class_prompt", "instance_data_dir", "class_data_dir")


class ConceptError(UserError):
    """One or more concepts are unusable; the message lists every problem and its fix."""


@dataclass
class Concept:
    """One thing to teach: a folder of instance images, and optionally a class to preserve."""

    instance_data_dir: str
    instance_prompt: str = ""
    class_prompt: str = ""
    class_data_dir: str = ""
    prompt_template: str | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict) -> Concept:
        known = {k: data[k] for k in (*SHIVAM_KEYS, "prompt_template") if k in data}
        extra = {k: v for k, v in data.items() if k not in known}
        for key in SHIVAM_KEYS:
            if known.get(key) is None:
                known[key] = ""
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "extra"}
        if data["prompt_template"] is None:
            del data["prompt_template"]
        return {**data, **self.extra}


def concept_problems(concept: Concept, index: int, need_class: bool = False) -> list[str]:
    """Everything wrong with one concept, as messages naming the field and the fix."""
    where = f"concept {index + 1}"
    problems = []
    for key in ("instance_prompt", "class_prompt", "instance_data_dir", "class_data_dir"):
        if not isinstance(getattr(concept, key), str):
            problems.append(f"{where}: '{key}' must be a string, got {getattr(concept, key)!r}.")
    template = concept.prompt_template
    if template is not None and not isinstance(template, str):
        problems.append(f"{where}: 'prompt_template' must be a string, got {template!r}.")
    elif template:
        problems += [f"{where}: {p}" for p in template_problems(template)]
    if problems:
        return problems
    problems += _folder_problems(where, "instance_data_dir", concept.instance_data_dir, True)
    if need_class or concept.class_data_dir:
        problems += _class_folder_problems(where, concept.class_data_dir)
    if need_class and not concept.class_prompt.strip():
        problems.append(f"{where}: prior preservation needs a 'class_prompt' (e.g. 'a photo of a dog').")
    return problems


def _folder_problems(where: str, key: str, path: str, need_images: bool) -> list[str]:
    if not path.strip():
        return [f"{where}: '{key}' is empty. Set it to a folder path (an empty path is never "
                "taken as the current folder)."]
    folder = Path(path)
    if not folder.is_dir():
        return [f"{where}: {key} {folder}{resolved_against(path)} does not exist or is not a folder. Fix the "
                "path (is Google Drive mounted?)."]
    if need_images and not has_images(folder, recursive=True):
        return [f"{where}: {key} {folder} contains no images (.jpg .png .webp ...). Put your "
                "images there or fix the path."]
    return []


def resolved_against(path: str | os.PathLike) -> str:
    """For a relative path, the note " (a relative path, resolved against the current folder
    <cwd>)" that a missing-folder message adds; "" for an absolute path."""
    if os.path.isabs(os.path.expanduser(path)):
        return ""
    return f" (a relative path, resolved against the current folder {os.getcwd()}; give the full path)"


def _class_folder_problems(where: str, path: str) -> list[str]:
    # A class folder may not exist yet: class-image generation creates it, provided its
    # parent exists (a missing parent is almost always a typo or an unmounted drive).
    folder = Path(path)
    if path.strip() and not folder.exists() and folder.parent.is_dir():
        return []
    return _folder_problems(where, "class_data_dir", path, False)


def concepts_problems(concepts: Sequence[Concept], need_class: bool = False) -> list[str]:
    """Every problem of every concept (wrong types, unknown template fields, missing
    folders or images), as messages naming the concept, the field and the fix.

    The one check extract and training both run before anything else.
    """
    if not concepts:
        return ["No concepts given: add at least one instance_data_dir."]
    return [p for i, c in enumerate(concepts) for p in concept_problems(c, i, need_class)]


def validate_concepts(concepts: list[Concept], need_class: bool = False) -> None:
    """Raise one `ConceptError` listing every problem in `concepts`, or return None."""
    problems = concepts_problems(concepts, need_class)
    if problems:
        raise ConceptError("\n".join(["Problems with the concepts:", *problems]))


def overlap_problems(concepts: Sequence[Concept], nested: bool = True) -> list[str]:
    """One message per instance folder that more than one concept uses, and (with
    `nested`) per folder inside another concept's folder.

    Linear in the number of concepts: folders are grouped by their resolved path, and
    each folder's parents are looked up, never compared pairwise.
    """
    users: dict[Path, list[int]] = {}
    resolved: dict[str, Path] = {}
    for i, concept in enumerate(concepts):
        path = concept.instance_data_dir
        if isinstance(path, str) and path.strip():
            if path not in resolved:
                resolved[path] = Path(path).resolve()
            users.setdefault(resolved[path], []).append(i)
    problems = [f"instance folders overlap: {folder} is used by {_numbers(ids)}: training would take its images "
                "once per listing and their caption files would clash. List each folder once (give each concept "
                "its own folder)." for folder, ids in users.items() if len(ids) > 1]
    if nested:
        for folder, ids in users.items():
            outer = next((p for p in folder.parents if p in users), None)
            if outer is not None:
                problems.append(f"instance folders overlap: {folder} ({_numbers(ids)}) is inside {outer} "
                                f"({_numbers(users[outer])}), which takes its images too: their caption "
                                "files would clash. Use separate folders, or --no_recursive.")
    return problems


def _numbers(ids: list[int], show: int = 10) -> str:
    """`concepts 1, 2 and 3`; long lists are cut short so a message stays one line."""
    names = [str(i + 1) for i in ids[:show]]
    if len(ids) > show:
        return f"concepts {', '.join(names)} and {len(ids) - show} more"
    if len(names) == 1:
        return f"concept {names[0]}"
    return f"concepts {', '.join(names[:-1])} and {names[-1]}"


def read_concepts(path: str | os.PathLike) -> list[Concept]:
    """Read a `concepts_list.json`; one clear error if it is not a list of objects."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # Windows Notepad writes a BOM
    except FileNotFoundError as exc:
        raise ConceptError(f"{path}: file not found. Write it with `python -m dbtools extract "
                           "--write_concepts_list` or fix the path.") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConceptError(f"{path}: not valid JSON ({exc}). Fix the file.") from exc
    except OSError as exc:
        raise ConceptError(f"{path}: cannot read it ({exc}). Fix the path.") from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise ConceptError(f"{path}: must be a JSON list of objects with keys "
                           f"{', '.join(SHIVAM_KEYS)}.")
    if not data:
        raise ConceptError(f"{path}: the list holds no concept. Add one object per concept with keys "
                           f"{', '.join(SHIVAM_KEYS)}, or write the file with `python -m dbtools extract "
                           "--write_concepts_list`.")
    return [Concept.from_dict(d) for d in data]


def write_concepts(path: str | os.PathLike, concepts: list[Concept]) -> Path:
    """Write `concepts` as Shivam's JSON list, atomically."""
    text = json.dumps([c.to_dict() for c in concepts], indent=4, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)
