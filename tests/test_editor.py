"""The caption editor (`dbtools.ui.editor`): paging, editing, saving, thumbnails, the widget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dbtools.ui import editor as E


@pytest.fixture
def photos(tmp_path, image_factory) -> Path:
    folder = tmp_path / "photos"
    for i in range(10):
        image_factory(folder / f"img{i}.png", size=(40, 30), color=(20 * i, 0, 0))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_editor_pages(photos):
    ed = E.CaptionEditor(photos, page_size=4)
    assert ed.n_pages == 3
    assert [p.name for p, _ in ed.page(0)] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert [p.name for p, _ in ed.page(2)] == ["img8.png", "img9.png"]
    assert ed.items == [(photos / "img8.png", ""), (photos / "img9.png", "")]
    with pytest.raises(IndexError):
        ed.page(3)


@pytest.mark.parametrize("fmt, caption_file", [
    ("sidecar", "img1.png.txt"), ("txt", "img1.txt"), ("caption", "img1.caption")])
def test_editor_edits_and_saves_caption_files(photos, fmt, caption_file):
    (photos / caption_file.replace("img1", "img2")).write_text("old caption\n")
    ed = E.CaptionEditor(photos, fmt=fmt, page_size=4)
    items = dict(ed.page(0))
    assert items[photos / "img2.png"] == "old caption"
    ed.set_caption(photos / "img1.png", "  a red  square\non grey ")
    ed.set_caption(photos / "img2.png", "old caption")  # unchanged: not rewritten
    ed.set_caption(photos / "img9.png", "on another page")
    assert dict(ed.items)[photos / "img1.png"] == "  a red  square\non grey "
    written = ed.save()
    other = caption_file.replace("img1", "img9")
    assert sorted(written) == sorted([photos / caption_file, photos / other])
    assert (photos / caption_file).read_text() == "a red square on grey\n"
    assert (photos / other).read_text() == "on another page\n"
    assert not [p for p in photos.iterdir() if p.name.startswith(".tmp-")]
    assert ed.save() == []  # nothing pending any more
    assert dict(E.CaptionEditor(photos, fmt=fmt).page(0))[photos / "img1.png"] == "a red square on grey"
    with pytest.raises(KeyError):
        ed.set_caption(photos / "notes.txt", "x")


def test_editor_filename_format_renames_without_overwriting(photos, image_factory):
    from dbtools.caption.autocaption import undo_renames

    image_factory(photos / "a red car_0.png", size=(40, 30))
    before = (photos / "img3.png").read_bytes()
    ed = E.CaptionEditor(photos, fmt="filename", page_size=4)
    assert dict(ed.page(0))[photos / "a red car_0.png"] == "a red car"
    ed.set_caption(photos / "img3.png", "a red car")
    ed.set_caption(photos / "img4.png", "a/red: car?")
    ed.set_caption(photos / "img5.png", "img5")  # same as its name: no rename
    written = ed.save()
    assert [p.name for p in written] == ["a red car_1.png", "a red car_2.png"]
    assert (photos / "a red car_1.png").read_bytes() == before
    assert (photos / "a red car_0.png").exists() and not (photos / "img3.png").exists()
    assert (photos / "img5.png").exists()
    assert photos / "a red car_1.png" in ed.images and photos / "img3.png" not in ed.images
    logs = list((photos / ".dbtools").glob("renames-*.jsonl"))
    assert len(logs) == 1
    records = [json.loads(line) for line in logs[0].read_text().splitlines()]
    assert records == [{"from": "img3.png", "to": "a red car_1.png"},
                       {"from": "img4.png", "to": "a red car_2.png"}]
    undo_renames(logs[0])  # the captioner's undo reverses the editor's renames
    assert (photos / "img3.png").read_bytes() == before and (photos / "img4.png").exists()


def test_editor_makes_thumbnails_lazily_and_caches_them(photos, monkeypatch):
    loads = []
    import dbtools.dataset.images

    images = dbtools.dataset.images
    real = images.load_rgb
    monkeypatch.setattr(images, "load_rgb", lambda p, *a, **k: loads.append(Path(p).name) or real(p, *a, **k))
    ed = E.CaptionEditor(photos, page_size=4, thumb=32)
    assert not (photos / ".dbtools").exists()  # the constructor writes nothing
    ed.page(1)
    assert sorted(loads) == ["img4.png", "img5.png", "img6.png", "img7.png"]
    thumbs = sorted(ed.thumbs_dir.glob("*.jpg"))
    assert len(thumbs) == 4
    with Image.open(thumbs[0]) as t:
        assert max(t.size) == 32
    loads.clear()
    ed.page(1)
    E.CaptionEditor(photos, page_size=4, thumb=32).page(1)  # a new editor reuses the cache
    assert loads == []
    Image.new("RGB", (50, 50), "blue").save(photos / "img5.png")  # changed image -> new thumbnail
    ed.page(1)
    assert loads == ["img5.png"]


def test_editor_widget_on_a_large_folder(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(1200):
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(folder / f"{i}.png")
    Image.new("RGB", (8, 8)).save(folder / "zz_broken.png")
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ed = E.CaptionEditor(folder, page_size=24, thumb=32)
    box = ed.widget
    grid = ed._ui["grid"]
    assert len(grid.children) == 24 and ed.n_pages == 51
    assert len(list(ed.thumbs_dir.iterdir())) == 24  # only the page shown
    ed._ui["next"].click()
    assert ed.current_page == 1 and len(list(ed.thumbs_dir.iterdir())) == 48
    area = ed._ui["areas"][folder / "24.png"]
    area.value = "typed in the browser"
    assert ed.pending == {folder / "24.png": "typed in the browser"}
    assert "1 unsaved edit(s)" in ed._ui["status"].value
    ed._ui["next"].click()  # another page: the edit is kept, and the editor says so
    assert "1 unsaved edit(s), kept when you change page" in ed._ui["status"].value
    ed._ui["prev"].click()
    ed.set_caption(folder / "25.png", "set from python")
    assert ed._ui["areas"][folder / "25.png"].value == "set from python"
    assert "2 unsaved edit(s)" in ed._ui["status"].value
    ed._ui["save"].click()
    assert (folder / "24.png.txt").read_text() == "typed in the browser\n"
    assert (folder / "25.png.txt").read_text() == "set from python\n"
    assert "Saved 2" in ed._ui["status"].value
    ed.page(ed.n_pages - 1)  # the unreadable image gets a placeholder, not an exception
    assert [p.name for p, _ in ed.items][-1] == "zz_broken.png"
    assert box is ed.widget
