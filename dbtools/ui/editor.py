"""The caption editor: review and fix the captions of a folder of images, a page at a time.

`CaptionEditor` works without a browser (`page(n)`, `items`, `set_caption`, `save()`)
and shows an ipywidgets UI in a notebook (`widget`). Captions live in a caption file
per image (`<image>.txt`, `<stem>.txt`, `<stem>.caption`) or in the file name itself
(EveryDream style); every write is atomic and a rename never replaces a file.
Importing this module has no side effects; ipywidgets and Pillow are imported on use.
"""

from __future__ import annotations

import hashlib
import html
import io
import logging
import os
from pathlib import Path
from typing import Any

from dbtools.caption import autocaption
from dbtools.core.atomic import atomic_save_image, atomic_write_text
from dbtools.core.errors import UserError
from dbtools.core.textio import read_caption_file
from dbtools.dataset import images
from dbtools.dataset.captions import (
    FORMAT_ALIASES,
    caption_candidates,
    caption_file_name,
    caption_from_filename,
    clean_caption,
    safe_filename_stem,
)
from dbtools.dataset.images import ImageError, is_image_name, list_images

logger = logging.getLogger(__name__)

CAPTION_FORMATS = ("sidecar", "txt", "caption", "filename")
"""The formats the editor reads and writes (and `text` for `txt`): see `dbtools.dataset.captions`."""
CACHE_DIR = ".dbtools"


def caption_path(image: Path, fmt: str) -> Path | None:
    """Where an image's caption lives in format `fmt` (None for `filename`: the name itself)."""
    name = caption_file_name(image.name, _editor_format(fmt))
    return None if name is None else image.with_name(name)


def _editor_format(fmt: str) -> str:
    """`fmt` under its table name, if the editor handles it; else `ValueError`."""
    name = FORMAT_ALIASES.get(fmt, fmt)
    if name not in CAPTION_FORMATS:
        raise UserError(f"unknown caption format {fmt!r}; use one of {', '.join(CAPTION_FORMATS)}.")
    return name


def read_caption(image: Path, fmt: str) -> str:
    """The image's current caption in format `fmt` ("" when its caption file is missing).

    A caption file in an encoding other than UTF-8 / UTF-16 with BOM raises
    `CaptionEncodingError` naming it (shown garbled, an edit would overwrite it)."""
    path = caption_path(image, fmt)
    if path is None:
        return caption_from_filename(image.name)
    try:
        return read_caption_file(path).strip()
    except FileNotFoundError:
        return ""


def free_caption_name(folder: Path, caption: str, ext: str, taken: set[str] = frozenset()) -> Path:
    """`<folder>/<safe caption>_<i><ext>` with the smallest `i` whose name is not in use."""
    i = 0
    while True:
        suffix = f"_{i}{ext}"
        name = safe_filename_stem(caption, suffix=suffix) + suffix
        if name not in taken and not (folder / name).exists():
            return folder / name
        i += 1


def rename_no_overwrite(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; `FileExistsError` instead of ever replacing an existing `dst`."""
    try:
        os.link(src, dst)  # fails atomically if dst exists
    except FileExistsError:
        raise FileExistsError(f"{dst}: already exists; not overwriting it.") from None
    except OSError:  # no hard links here (e.g. some network drives): check, then rename
        if dst.exists():
            raise FileExistsError(f"{dst}: already exists; not overwriting it.") from None
        os.rename(src, dst)
        return
    os.unlink(src)


class CaptionEditor:
    """Review and fix captions of the images in `folder`, a page at a time.

    `fmt` is where captions live: `"sidecar"` (`<image>.txt`, what training reads),
    `"txt"` (`<stem>.txt`), `"caption"` (`<stem>.caption`) or `"filename"` (the caption
    is the file name, EveryDream style). Thumbnails are made only for the page shown and
    cached under `<folder>/.dbtools/thumbs/` (keyed by path, mtime and size), so large
    folders open instantly. The Python side works without a browser: `page(n)`,
    `items`, `set_caption(path, text)`, `save()`; `widget` is the ipywidgets UI.
    Nothing is written until `save()` (or the Save button).
    """

    def __init__(self, folder: str | os.PathLike, fmt: str = "sidecar", page_size: int = 24, thumb: int = 128):
        fmt = _editor_format(fmt)
        if page_size < 1 or thumb < 16:
            raise UserError("page_size must be at least 1 and thumb at least 16 pixels.")
        self.folder = Path(folder)
        self.fmt = fmt
        self.page_size = page_size
        self.thumb = thumb
        self.images: list[Path] = list_images(self.folder)
        self.current_page = 0
        self._saved: dict[Path, str] = {}
        self._edits: dict[Path, str] = {}
        self._ui: dict[str, Any] | None = None
        self._syncing = False
        self.notes: list[str] = []
        """What the last `save()` changed besides the captions (caption files that followed a rename)."""
        if self.fmt == "txt":
            _warn_shared_stems(self.images)
        orphans = orphaned_caption_files(self.folder, self.images)
        if orphans:
            logger.warning("%d caption file(s) in %s belong to no image (training ignores them): %s",
                           len(orphans), self.folder, ", ".join(p.name for p in orphans[:5])
                           + (", ..." if len(orphans) > 5 else ""))

    # ----------------------------------------------------------------- paging and captions

    @property
    def n_pages(self) -> int:
        return max(1, -(-len(self.images) // self.page_size))

    def page_images(self, n: int | None = None) -> list[Path]:
        """The images on page `n` (default: the current page)."""
        n = self.current_page if n is None else n
        return self.images[n * self.page_size:(n + 1) * self.page_size]

    def page(self, n: int) -> list[tuple[Path, str]]:
        """Show page `n` (0-based): make its thumbnails (cached) and return its items."""
        if not 0 <= n < self.n_pages:
            raise IndexError(f"page {n} does not exist; pages are 0..{self.n_pages - 1}.")
        self.current_page = n
        for image in self.page_images():
            self.thumbnail(image)
        if self._ui is not None:
            self._render()
        return self.items

    @property
    def items(self) -> list[tuple[Path, str]]:
        """`(image path, caption)` for the current page, including unsaved edits."""
        return [(image, self.caption(image)) for image in self.page_images()]

    def caption(self, image: Path) -> str:
        """The caption shown for `image`: the unsaved edit, else the saved one."""
        image = Path(image)
        if image in self._edits:
            return self._edits[image]
        if image not in self._saved:
            self._saved[image] = read_caption(image, self.fmt)
        return self._saved[image]

    def set_caption(self, image: str | os.PathLike, text: str) -> None:
        """Change the caption of `image` (any page); written by the next `save()`."""
        image = Path(image)
        if image not in set(self.images):
            raise KeyError(f"{image}: not one of the images in {self.folder}.")
        self.caption(image)  # remember the saved caption before editing
        self._edits[image] = text
        if self._ui is not None and not self._syncing:
            area = self._ui["areas"].get(image)
            if area is not None and area.value != text:
                self._syncing = True
                try:
                    area.value = text
                finally:
                    self._syncing = False
        self._show_pending()

    @property
    def pending(self) -> dict[Path, str]:
        """Edited captions that differ from what is saved on disk."""
        return {img: text for img, text in self._edits.items()
                if clean_caption(text) != clean_caption(self._saved.get(img, ""))}

    # ----------------------------------------------------------------- saving

    def save(self) -> list[Path]:
        """Write every changed caption; return the files written (or renamed images).

        Caption files are written atomically. In `filename` format an image is renamed to
        `<safe caption>_<i><ext>` with the first free `i` (never overwriting a file) and
        the renames are logged to `<folder>/.dbtools/renames-<time>.jsonl`; the image's
        caption files for training (the Omnitool's `<image>.txt`, `<stem>.txt`,
        `<stem>.caption`) follow it, with the old caption replaced by the new one in their
        text (a file that does not hold the old caption is moved as it is). `notes` then
        says what else changed.
        """
        self.notes = []
        changes = {img: clean_caption(text) for img, text in self.pending.items()}
        if self.fmt == "filename":
            written = self._rename_images(changes)
        else:
            written = self._write_caption_files(changes)
        self._edits.clear()
        if self._ui is not None:
            self._render()
        return written

    def _write_caption_files(self, changes: dict[Path, str]) -> list[Path]:
        written = []
        for image, text in changes.items():
            path = caption_path(image, self.fmt)
            atomic_write_text(path, text + "\n" if text else "")
            self._saved[image] = text
            self._edits.pop(image, None)
            written.append(path)
        logger.info("saved %d caption file(s) in %s", len(written), self.folder)
        return written

    def _rename_images(self, changes: dict[Path, str]) -> list[Path]:
        renamed: list[Path] = []
        taken: set[str] = set()
        log = None
        for image, text in changes.items():
            if not text:
                logger.warning("%s: empty caption; a file name needs one, so it was not renamed.", image)
                continue
            target = free_caption_name(image.parent, text, image.suffix, taken)
            log = log or autocaption.new_renames_log(self.folder)
            old_caption = self._saved.get(image, "")
            _record_rename(log, self.folder, image, target, text)
            taken.add(target.name)
            renamed.append(target)
            self._after_rename(image, target)
            self.notes += self._follow_caption_files(log, image, target, old_caption, text)
        if renamed:
            logger.info("renamed %d image(s); undo with: python -m dbtools caption --undo %s", len(renamed), log)
        for note in self.notes:
            logger.info("%s", note)
        return renamed

    def _follow_caption_files(self, log: Path, old: Path, new: Path, old_caption: str, caption: str) -> list[str]:
        """Move `old`'s caption files for training to `new`'s names (each move logged for
        undo) and put `caption` in place of `old_caption` in their text; one note each."""
        notes = []
        stems = {p.stem for p in self.images}
        for src_name, dst_name in zip(caption_candidates(old.name), caption_candidates(new.name)):
            src, dst = old.with_name(src_name), new.with_name(dst_name)
            if not src.is_file() or (src_name.startswith(old.stem + ".") and old.stem in stems):
                continue  # none, or a `<stem>` file another image still uses
            if dst.exists():
                notes.append(f"{src.name} was left as it is: {dst.name} exists already.")
                continue
            text = read_caption_file(src).strip()
            updated = replace_caption(text, old_caption, caption)
            autocaption.append_jsonl(log, {"from": _relative(src, self.folder), "to": _relative(dst, self.folder)})
            rename_no_overwrite(src, dst)
            if updated is None:
                notes.append(f"{dst.name} (was {src.name}) moved with its image; it does not hold the old "
                             f"caption, so its text stays {text!r}: check it.")
                continue
            atomic_write_text(dst, updated + "\n")
            notes.append(f"{dst.name} (was {src.name}), read by training, now holds {updated!r}.")
        return notes

    def _after_rename(self, old: Path, new: Path) -> None:
        self.images[self.images.index(old)] = new
        self._edits.pop(old, None)
        self._saved.pop(old, None)
        self._saved[new] = read_caption(new, self.fmt)
        try:  # the image bytes did not change: keep its thumbnail
            cached = self.thumbnail_path(old, stat=new.stat())
            if cached.exists():
                os.replace(cached, self.thumbnail_path(new))
        except OSError:
            pass

    # ----------------------------------------------------------------- thumbnails

    @property
    def thumbs_dir(self) -> Path:
        return self.folder / CACHE_DIR / "thumbs"

    def thumbnail_path(self, image: Path, stat: os.stat_result | None = None) -> Path:
        """The cache file for `image`'s thumbnail; changes when the image changes."""
        st = stat or image.stat()
        key = f"{image.resolve()}|{st.st_mtime_ns}|{st.st_size}|{self.thumb}"
        return self.thumbs_dir / (hashlib.sha1(key.encode("utf-8")).hexdigest()[:24] + ".jpg")

    def thumbnail(self, image: Path) -> bytes:
        """JPEG bytes of `image`'s thumbnail, made once and then read from the cache."""
        path = self.thumbnail_path(image)
        if path.is_file():
            return path.read_bytes()
        try:
            img = images.load_rgb(image)
        except ImageError as exc:
            logger.warning("%s", exc)
            return _placeholder_jpeg(self.thumb)
        img.thumbnail((self.thumb, self.thumb))
        atomic_save_image(img, path, quality=85)
        return path.read_bytes()

    # ----------------------------------------------------------------- widget

    @property
    def widget(self):
        """The ipywidgets editor (built on first use): thumbnails, captions, paging, Save."""
        if self._ui is None:
            self._ui = self._build_ui()
            self.page(self.current_page)
        return self._ui["box"]

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _build_ui(self) -> dict[str, Any]:
        import ipywidgets as w

        prev_b = w.Button(description="◀ Prev", layout=w.Layout(width="90px"))
        next_b = w.Button(description="Next ▶", layout=w.Layout(width="90px"))
        save_b = w.Button(description="Save", button_style="success", icon="save")
        label, status = w.HTML(), w.HTML()
        grid = w.GridBox(layout=w.Layout(
            grid_template_columns=f"repeat(auto-fill, minmax({self.thumb + 60}px, 1fr))", grid_gap="8px"))
        prev_b.on_click(lambda _: self.page(max(0, self.current_page - 1)))
        next_b.on_click(lambda _: self.page(min(self.n_pages - 1, self.current_page + 1)))
        save_b.on_click(lambda _: self._save_clicked())
        box = w.VBox([w.HBox([prev_b, label, next_b, save_b]), status, grid])  # status: a line of its own
        return dict(box=box, grid=grid, label=label, status=status, prev=prev_b, next=next_b,
                    save=save_b, areas={})

    def _render(self) -> None:
        import ipywidgets as w

        ui = self._ui
        first = self.current_page * self.page_size
        ui["label"].value = ("<span style='white-space:nowrap'>" + (
            f"&nbsp;page {self.current_page + 1}/{self.n_pages} &nbsp;"
            f"(images {first + 1}-{first + len(self.page_images())} of {len(self.images)})&nbsp;"
            if self.images else f"&nbsp;no images in {html.escape(str(self.folder))}&nbsp;") + "</span>")
        ui["prev"].disabled = self.current_page == 0
        ui["next"].disabled = self.current_page >= self.n_pages - 1
        ui["areas"] = {}
        for card in ui["grid"].children:  # free the previous page's widgets in the browser
            _close_tree(card)
        cards = []
        for image, caption in self.items:
            area = w.Textarea(value=caption, layout=w.Layout(width="100%", height="4.5em"))
            area.observe(lambda change, img=image: self._area_changed(img, change["new"]), names="value")
            ui["areas"][image] = area
            # every card alike: a square picture box, the name on one line (in full on hover)
            picture = w.Image(value=self.thumbnail(image), format="jpeg", layout=w.Layout(
                width=f"{self.thumb}px", height=f"{self.thumb}px", object_fit="contain", align_self="center"))
            name = w.HTML(f"<div title='{html.escape(image.name)}' style='white-space:nowrap;overflow:hidden;"
                          f"text-overflow:ellipsis;font-size:smaller;line-height:1.4'>{html.escape(image.name)}</div>",
                          layout=w.Layout(width="100%"))
            cards.append(w.VBox([picture, name, area], layout=w.Layout(border="1px solid #ddd", padding="4px",
                                                                       overflow="hidden")))
        ui["grid"].children = cards
        self._show_pending()

    def _show_pending(self) -> None:
        """The status line says when edits wait for Save (they are kept across pages)."""
        if self._ui is None:
            return
        n = len(self.pending)
        if n:
            self._ui["status"].value = (f"<b style='color:#b45f06'>{n} unsaved edit(s), kept when you change "
                                        "page: press Save</b>")
        elif "unsaved" in self._ui["status"].value:
            self._ui["status"].value = ""

    def _area_changed(self, image: Path, text: str) -> None:
        if not self._syncing:
            self._syncing = True
            try:
                self.set_caption(image, text)
            finally:
                self._syncing = False

    def _save_clicked(self) -> None:
        try:
            written = self.save()
        except Exception as exc:  # shown in the widget: a button click has no traceback to read
            logger.exception("saving captions failed")
            self._ui["status"].value = f"<b style='color:#c00'>Not saved: {html.escape(str(exc))}</b>"
            return
        self._ui["status"].value = "<br>".join(html.escape(line) for line in
                                               [f"Saved {len(written)} file(s).", *self.notes])


def replace_caption(text: str, old: str, new: str) -> str | None:
    """`text` (a caption file's prompt, e.g. `sks style, <caption>, a painting`) with the
    one comma-separated occurrence of the caption `old` replaced by `new`; None when `old`
    is not in it exactly once as a whole part."""
    import re

    if not old:
        return None
    pattern = re.compile(r"(^|,\s*)" + re.escape(old) + r"(?=\s*,|$)")
    if len(pattern.findall(text)) != 1:
        return None
    return pattern.sub(lambda m: m.group(1) + new, text)


def orphaned_caption_files(folder: Path, images: list[Path]) -> list[Path]:
    """Caption files named after an image (`<image name>.txt`, what the Omnitool writes) in
    the folders of `images` whose image is not there (renamed or deleted)."""
    names = {image.name for image in images}
    folders = {image.parent for image in images} | {Path(folder)}
    return sorted(p for d in folders if d.is_dir() for p in d.iterdir()
                  if p.suffix == ".txt" and is_image_name(p.stem) and p.stem not in names and p.is_file())


def _relative(path: Path, folder: Path) -> str:
    return Path(os.path.relpath(path, folder)).as_posix()


def _close_tree(widget) -> None:
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    widget.close()


def _warn_shared_stems(images: list[Path]) -> None:
    seen: dict[Path, Path] = {}
    for image in images:
        key = image.with_suffix("")
        if key in seen:
            logger.warning("%s and %s share the caption file %s.txt; use fmt='sidecar' to give each "
                           "image its own.", seen[key].name, image.name, key.name)
        seen.setdefault(key, image)


def _placeholder_jpeg(size: int) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (90, 90, 90))
    ImageDraw.Draw(img).text((4, size // 2), "unreadable", fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _record_rename(log: Path, folder: Path, src: Path, dst: Path, caption: str) -> None:
    """Rename `src` to `dst` (never overwriting), recorded the way the auto-captioner does.

    The rename goes into `log` (`<folder>/.dbtools/renames-<time>.jsonl`) before it
    happens, so `python -m dbtools caption --undo <log>` can reverse it; afterwards the
    new name is added to the captioning manifest as a filename-format output, so a
    later captioning run of the folder keeps the hand-edited name.
    """
    if dst.exists():
        raise FileExistsError(f"{dst}: already exists; not overwriting it.")
    autocaption.append_jsonl(log, {"from": _relative(src, folder), "to": _relative(dst, folder)})
    rename_no_overwrite(src, dst)
    autocaption.append_jsonl(autocaption.manifest_path(folder), {
        "source": os.path.abspath(src), "output": _relative(dst, folder), "format": "filename",
        "caption": caption, "action": "renamed", "renames_log": log.name})
