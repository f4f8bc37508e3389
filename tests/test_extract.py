"""The Omnitool: file names -> caption files, safely and idempotently."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dbtools import cli
from dbtools.dataset.concepts import Concept, ConceptError, read_concepts
from dbtools.dataset.extract import (
    CAPTION_TEMPLATE_KEY,
    ExtractConfig,
    caption_planner,
    decide,
    main,
    plan_caption,
    run_extract,
)


def touch(folder: Path, *names: str) -> None:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # extract only looks at names


def cfg(**kw) -> ExtractConfig:
    return ExtractConfig(progress=False, **kw)


def age(path: Path) -> None:
    """Set an old mtime so an unwanted rewrite would show up in st_mtime_ns."""
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "images"
    touch(d, "red_car_3.png", "00012@a dog.jpg", "a cat (2).png", "a_b_c_12.JPG", "sunset.webp")
    return d


# --------------------------------------------------------------------------- pure rules


@pytest.mark.parametrize("name, caption", [
    ("red_car_3.png", "red car"),
    ("00012@a dog.jpg", "a dog"),
    ("a cat (2).png", "a cat"),
    ("a_b_c_12.JPG", "a b c"),
    ("a red car_3.png", "a red car"),
    ("portrait of a woman.webp", "portrait of a woman"),
    ("Sunset Over Sea.PNG", "Sunset Over Sea"),
    ("a  dog   running_7.jpeg", "a dog running"),
])
def test_plan_caption_method_1_is_the_caption(name, caption):
    assert plan_caption(name, Concept("x")) == caption


def test_plan_caption_method_2_and_empty_parts():
    both = Concept("x", instance_prompt="sks", class_prompt="a car")
    assert plan_caption("red_car_3.png", both) == "sks, red car, a car"
    assert plan_caption("red_car_3.png", Concept("x", instance_prompt="sks")) == "sks, red car"
    assert plan_caption("red_car_3.png", Concept("x", class_prompt="a car")) == "red car, a car"
    assert plan_caption("red_car_3.png", both, "{caption} by {instance_prompt}") == "red car by sks"
    # A file name without caption text leaves the prompts, never stray commas.
    assert plan_caption("_3.png", both) == "sks, a car"
    assert plan_caption("_3.png", Concept("x")) == ""
    for text in (plan_caption("red_car_3.png", both), plan_caption("_3.png", both)):
        assert "|" not in text


@pytest.mark.parametrize("template", [
    "{caption}", "{instance_prompt}, {caption}, {class_prompt}", "{caption}, in the style of {instance_prompt}",
    "photo of {instance_prompt} {class_prompt}: {caption}", ", {caption} ,", "{caption}{caption}",
])
def test_planner_gives_exactly_plan_caption(template):
    names = ["red_car_3.png", "a, b_2.png", "x ,, y.jpg", "_1.png", "a  b.png", "ünï cödé_9.webp",
             "tab\there.png", "12@, lead.png", "end,.png", "(3).png"]
    for concept in (Concept("x"), Concept("x", "sks", "a car"), Concept("x", " sks ", "")):
        plan = caption_planner(concept, template)
        for name in names:
            assert plan(name) == plan_caption(name, concept, template), (template, name)


def test_decide():
    assert decide(None, b"a", False) == "written"
    assert decide(b"", b"a", False) == "written"  # an empty file (e.g. after a power cut)
    assert decide(b"a", b"a", False) == "unchanged"
    assert decide(b"\xef\xbb\xbfa\n", b"a", False) == "unchanged"  # BOM + newline from an editor
    assert decide(b"my edit", b"a", False) == "kept"
    assert decide(b"my edit", b"a", True) == "replaced"
    assert decide(None, b"", True) == "no caption"
    assert decide(b"my edit", b"", True) == "kept"  # never replace a caption with nothing


# --------------------------------------------------------------------------- the run


def test_writes_sidecar_captions_for_every_image(folder):
    summary = run_extract([Concept(str(folder))], cfg())
    assert (folder / "red_car_3.png.txt").read_text() == "red car"
    assert (folder / "00012@a dog.jpg.txt").read_text() == "a dog"
    assert (folder / "a cat (2).png.txt").read_text() == "a cat"
    assert (folder / "a_b_c_12.JPG.txt").read_text() == "a b c"
    assert (folder / "sunset.webp.txt").read_text() == "sunset"
    assert summary.counts["written"] == 5 and summary.images == 5 and summary.ok
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_stem_naming(folder):
    run_extract([Concept(str(folder))], cfg(naming="stem"))
    assert (folder / "red_car_3.txt").read_text() == "red car"
    assert not (folder / "red_car_3.png.txt").exists()


def test_stem_naming_shared_caption_file(tmp_path):
    touch(tmp_path, "car.png", "car.jpg")
    summary = run_extract([Concept(str(tmp_path))], cfg(naming="stem"))
    assert (tmp_path / "car.txt").read_text() == "car"
    assert summary.counts["written"] == 1 and summary.counts["unchanged"] == 1


def test_method_2_files(folder):
    run_extract([Concept(str(folder), "sks", "a car")], cfg())
    assert (folder / "red_car_3.png.txt").read_text() == "sks, red car, a car"
    run_extract([Concept(str(folder), "sks", "a car")], cfg(template="{caption} by {instance_prompt}",
                                                            overwrite=True))
    assert (folder / "red_car_3.png.txt").read_text() == "red car by sks"


def test_rerun_is_idempotent_mtime_unchanged(folder):
    run_extract([Concept(str(folder), "sks")], cfg())
    txts = sorted(folder.glob("*.txt"))
    for p in txts:
        age(p)
    before = {p: (p.stat().st_mtime_ns, p.read_text()) for p in txts}
    summary = run_extract([Concept(str(folder), "sks")], cfg())
    assert summary.counts["unchanged"] == 5 and summary.counts["written"] == 0
    assert {p: (p.stat().st_mtime_ns, p.read_text()) for p in txts} == before
    # No `caption|instance|class` on a second run (the old tool's bug).
    assert all("|" not in p.read_text() for p in txts)


def test_hand_edits_are_kept_unless_overwrite(folder):
    run_extract([Concept(str(folder))], cfg())
    edited = folder / "red_car_3.png.txt"
    edited.write_text("a shiny red sports car")
    age(edited)
    summary = run_extract([Concept(str(folder))], cfg())
    assert edited.read_text() == "a shiny red sports car"
    assert edited.stat().st_mtime_ns == 1_000_000_000
    assert summary.kept == [edited] and summary.counts["kept"] == 1
    assert "--overwrite" in summary.describe()
    summary = run_extract([Concept(str(folder))], cfg(overwrite=True))
    assert edited.read_text() == "red car" and summary.counts["replaced"] == 1


def test_existing_caption_with_newline_counts_as_unchanged(folder):
    (folder / "sunset.webp.txt").write_text("sunset\n")
    age(folder / "sunset.webp.txt")
    summary = run_extract([Concept(str(folder))], cfg())
    assert summary.counts["unchanged"] == 1
    assert (folder / "sunset.webp.txt").stat().st_mtime_ns == 1_000_000_000


def test_empty_caption_file_is_rewritten(folder):
    (folder / "sunset.webp.txt").write_text("")
    summary = run_extract([Concept(str(folder))], cfg())
    assert (folder / "sunset.webp.txt").read_text() == "sunset"
    assert summary.counts["written"] == 5


def test_old_pipe_format_is_reported(folder):
    (folder / "sunset.webp.txt").write_text("sunset|sks|a photo")
    summary = run_extract([Concept(str(folder))], cfg())
    assert summary.legacy == [folder / "sunset.webp.txt"]
    assert "caption|instance|class" in summary.describe()
    run_extract([Concept(str(folder))], cfg(overwrite=True))
    assert (folder / "sunset.webp.txt").read_text() == "sunset"


def test_log_file_lists_every_action(folder):
    run_extract([Concept(str(folder))], cfg())
    (folder / "red_car_3.png.txt").write_text("hand edit")
    (folder / "sunset.webp.txt").unlink()
    summary = run_extract([Concept(str(folder))], cfg())
    [log] = summary.log_files
    assert log.parent == folder / ".dbtools" and log.name.startswith("extract-")
    rows = [line.split("\t") for line in log.read_text().splitlines() if not line.startswith("#")]
    actions = {row[1]: row[0] for row in rows}
    assert actions == {"red_car_3.png.txt": "kept", "sunset.webp.txt": "written",
                       "00012@a dog.jpg.txt": "unchanged", "a cat (2).png.txt": "unchanged",
                       "a_b_c_12.JPG.txt": "unchanged"}
    assert ["written", "sunset.webp.txt", "sunset"] in rows
    assert "1 written" in log.read_text() and "1 kept" in log.read_text()
    # A second run gets its own log; the log folder holds no images.
    again = run_extract([Concept(str(folder))], cfg()).log_files[0]
    assert again != log and log.exists()


def test_log_dir_option(folder, tmp_path):
    summary = run_extract([Concept(str(folder))], cfg(log_dir=str(tmp_path / "logs")))
    assert summary.log_files[0].parent == tmp_path / "logs"
    assert not (folder / ".dbtools").exists()


def test_verbose_logs_each_file(folder, caplog):
    with caplog.at_level("INFO", logger="dbtools.dataset.extract"):
        run_extract([Concept(str(folder))], cfg(verbose=True))
    assert "written  red_car_3.png.txt  red car" in caplog.text


def test_recursive_and_non_images_ignored(tmp_path):
    touch(tmp_path, "top_1.png", "sub/deep/inner_2.jpg", "Thumbs.db", ".DS_Store", "x.caption",
          "notes.txt", ".ipynb_checkpoints/ckpt_1.png", "._mac.png", ".hidden/h.png",
          "readme.md", "sub/model.ckpt")
    summary = run_extract([Concept(str(tmp_path))], cfg())
    assert (tmp_path / "top_1.png.txt").read_text() == "top"
    assert (tmp_path / "sub/deep/inner_2.jpg.txt").read_text() == "inner"
    assert summary.images == 2
    for junk in ("Thumbs.db.txt", ".DS_Store.txt", "x.caption.txt", "notes.txt.txt", "readme.md.txt",
                 ".ipynb_checkpoints/ckpt_1.png.txt", "._mac.png.txt", ".hidden/h.png.txt"):
        assert not (tmp_path / junk).exists(), junk
    log = summary.log_files[0].read_text()
    assert "sub/deep/inner_2.jpg.txt" in log
    summary = run_extract([Concept(str(tmp_path))], cfg(recursive=False))
    assert summary.images == 1


def test_name_without_caption_is_reported(tmp_path):
    touch(tmp_path, "_3.png", "ok.png")
    summary = run_extract([Concept(str(tmp_path))], cfg())
    assert summary.no_caption == [tmp_path / "_3.png"] and not summary.ok
    assert not (tmp_path / "_3.png.txt").exists()
    assert "_3.png: the file name gives no caption" in summary.describe()


def test_unwritable_file_is_reported_and_others_continue(folder):
    (folder / "sunset.webp.txt").mkdir()  # a folder where the caption file should be
    summary = run_extract([Concept(str(folder))], cfg())
    assert [p for p, _ in summary.failed] == [folder / "sunset.webp.txt"]
    assert summary.counts["written"] == 4 and not summary.ok


def test_several_concepts_and_concepts_list_round_trip(tmp_path):
    a, b, cls = tmp_path / "a", tmp_path / "b", tmp_path / "class"
    touch(a, "red_car_1.png")
    touch(b, "blue_bird_2.png")
    cls.mkdir()
    out = tmp_path / "concepts_list.json"
    concepts = [Concept(str(a), "sks", "a car", str(cls)), Concept(str(b))]
    summary = run_extract(concepts, cfg(write_concepts_list=str(out)))
    data = json.loads(out.read_text())
    assert [d["instance_data_dir"] for d in data] == [str(a), str(b)]
    assert data[0]["instance_prompt"] == "sks" and data[0]["class_data_dir"] == str(cls)
    # The files hold the final prompt: nothing for training to apply a second time.
    assert all("prompt_template" not in d for d in data)
    assert data[0][CAPTION_TEMPLATE_KEY] == "{instance_prompt}, {caption}, {class_prompt}"
    assert summary.concepts_list == out and len(summary.log_files) == 2
    # A re-run from the written file changes nothing, even with a custom template.
    run_extract(read_concepts(out), cfg(template="{caption} ({instance_prompt})", overwrite=True,
                                        write_concepts_list=str(out)))
    again = run_extract(read_concepts(out), cfg())
    assert again.counts["unchanged"] == 2
    assert (a / "red_car_1.png.txt").read_text() == "red car (sks)"


def test_concept_with_prompt_template_gets_caption_only(tmp_path):
    touch(tmp_path / "a", "red_car_1.png")
    concept = Concept(str(tmp_path / "a"), "sks", prompt_template="{instance_prompt} {caption}")
    summary = run_extract([concept], cfg())
    assert (tmp_path / "a" / "red_car_1.png.txt").read_text() == "red car"
    assert summary.concepts[0].prompt_template == "{instance_prompt} {caption}"
    with pytest.raises(ConceptError, match="second time"):
        run_extract([concept], cfg(template="{caption}"))


def test_problems_are_listed_together_and_nothing_is_written(tmp_path):
    good, empty = tmp_path / "good", tmp_path / "empty"
    touch(good, "a_1.png")
    touch(empty, "notes.txt")
    concepts = [Concept(str(good)), Concept(str(tmp_path / "missing")), Concept(str(empty)),
                Concept(str(good), instance_prompt=3), Concept("")]
    out = tmp_path / "c.json"
    with pytest.raises(ConceptError) as err:
        run_extract(concepts, cfg(template="{nope}", write_concepts_list=str(out)))
    msg = str(err.value)
    for needle in ("missing", "contains no images", "must be a string", "'instance_data_dir' is empty",
                   "unknown field", "overlap"):
        assert needle in msg, needle
    assert not (good / "a_1.png.txt").exists() and not out.exists()
    assert not (good / ".dbtools").exists()


def test_nested_instance_folders_are_refused(tmp_path):
    touch(tmp_path, "a/x_1.png", "a/b/y_1.png")
    with pytest.raises(ConceptError, match="overlap"):
        run_extract([Concept(str(tmp_path / "a")), Concept(str(tmp_path / "a" / "b"))], cfg())
    run_extract([Concept(str(tmp_path / "a")), Concept(str(tmp_path / "a" / "b"))],
                cfg(recursive=False))


def test_speed_shortcut_never_replaces_a_file_created_meanwhile(tmp_path, monkeypatch):
    # A caption file that appears between the folder scan and the write is compared,
    # not clobbered.
    touch(tmp_path, "red_car_1.png")
    import dbtools.dataset.extract as extract

    real_scan = extract.scan_folder

    def scan_then_user_writes(*args, **kw):
        result = real_scan(*args, **kw)
        (tmp_path / "red_car_1.png.txt").write_text("typed by hand")
        return result

    monkeypatch.setattr(extract, "scan_folder", scan_then_user_writes)
    summary = run_extract([Concept(str(tmp_path))], cfg())
    assert (tmp_path / "red_car_1.png.txt").read_text() == "typed by hand"
    assert summary.counts["kept"] == 1


# --------------------------------------------------------------------------- command line


def test_cli_one_concept(folder, tmp_path, capsys):
    out = tmp_path / "concepts_list.json"
    code = main(["--instance_data_dir", str(folder), "--instance_prompt", "sks", "--class_prompt",
                 "a car", "--write_concepts_list", str(out), "--no_progress"])
    assert code == 0
    assert (folder / "red_car_3.png.txt").read_text() == "sks, red car, a car"
    assert "5 written" in capsys.readouterr().out
    assert read_concepts(out)[0].instance_prompt == "sks"


def test_cli_through_dbtools_entry_point(folder, capsys):
    assert cli.main(["extract", "--instance_data_dir", str(folder), "--naming", "stem",
                     "--template", "{caption}, photo", "--no_progress"]) == 0
    assert (folder / "red_car_3.txt").read_text() == "red car, photo"


def test_cli_concepts_list(tmp_path, capsys):
    touch(tmp_path / "a", "red_car_1.png")
    cl = tmp_path / "concepts_list.json"
    cl.write_text(json.dumps([{"instance_prompt": "sks", "class_prompt": "",
                               "instance_data_dir": str(tmp_path / "a"), "class_data_dir": ""}]))
    assert main(["--concepts_list", str(cl), "--verbose", "--no_progress"]) == 0
    assert (tmp_path / "a" / "red_car_1.png.txt").read_text() == "sks, red car"


def test_cli_exit_codes(tmp_path, folder, capsys):
    def main(argv):
        return cli.main(["extract", *argv])

    assert main([]) == 2  # neither --instance_data_dir nor --concepts_list
    assert main(["--instance_data_dir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["--concepts_list", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["--concepts_list", str(bad), "--instance_prompt", "x"]) == 2
    assert main(["--instance_data_dir", str(folder), "--template", "{oops"]) == 2
    assert main(["--instance_data_dir", str(folder), "--naming", "weird"]) == 2
    assert main(["--help"]) == 0
    touch(folder, "_7.png")
    assert main(["--instance_data_dir", str(folder), "--no_progress"]) == 1
    assert "gives no caption" in capsys.readouterr().out
    assert not any(p.name.startswith(".tmp-") for p in folder.iterdir())


def test_written_files_are_readable_like_normal_files(folder):
    old = os.umask(0o022)
    try:
        run_extract([Concept(str(folder))], cfg())
    finally:
        os.umask(old)
    assert (folder / "sunset.webp.txt").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- hostile folders


def test_link_loops_do_not_crash_or_hide_a_good_image(tmp_path, capsys):
    folder = tmp_path / "data"
    touch(folder, "a red car_1.png")
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(folder)
    assert cli.main(["extract", "--instance_data_dir", str(folder), "--no_progress"]) == 0
    assert (folder / "a red car_1.png.txt").read_text() == "a red car"
    assert not (folder / "loop.png.txt").exists() and not (folder / "gone.png.txt").exists()
    assert "1 images" in capsys.readouterr().out


def test_a_too_long_caption_file_name_says_use_naming_stem(tmp_path, capsys):
    folder = tmp_path / "data"
    name = "a" * 251 + ".png"  # 255 bytes: fine for the image, too long for `<name>.txt`
    touch(folder, name)
    assert cli.main(["extract", "--instance_data_dir", str(folder), "--no_progress"]) == 1
    out = capsys.readouterr().out
    assert "259 bytes" in out and "--naming stem" in out and "/proc/self" not in out
    assert cli.main(["extract", "--instance_data_dir", str(folder), "--naming", "stem",
                     "--no_progress"]) == 0
    assert (folder / ("a" * 251 + ".txt")).read_text() == "a" * 251


def test_non_utf8_file_names_are_logged_and_summarised(tmp_path, capsys):
    folder = tmp_path / "data"
    touch(folder, "a red car_1.png")
    os.close(os.open(os.fsencode(folder) + b"/caf\xe9 car_2.png", os.O_CREAT | os.O_WRONLY))
    assert cli.main(["extract", "--instance_data_dir", str(folder), "--no_progress"]) == 1
    out = capsys.readouterr().out
    assert "1 written" in out and "1 failed" in out and "caf\\xe9 car_2.png" in out
    assert "not valid UTF-8" in out
    (log,) = (folder / ".dbtools").glob("extract-*.log")
    assert "failed\tcaf\\xe9 car_2.png" in log.read_text(encoding="utf-8")


def test_disk_full_is_one_message_with_the_space_needed_and_the_summary(tmp_path, monkeypatch, capsys):
    import errno

    from dbtools.dataset import extract

    folder = tmp_path / "data"
    touch(folder, *[f"car_{i}.png" for i in range(7)])

    def full(path, data, fsync=True):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(extract, "atomic_create", full)
    monkeypatch.setattr(extract, "atomic_put", full)
    assert cli.main(["extract", "--instance_data_dir", str(folder), "--no_progress"]) == 1
    out = capsys.readouterr().out
    assert "7 images in 1 concept(s)" in out and "7 failed" in out
    (line,) = [text for text in out.splitlines() if "disk is full" in text]
    assert line.startswith(f"{folder}: the disk is full; 7 caption file(s)") and "28 KB" in line
    assert not any(p.name.startswith(".tmp-") for p in folder.iterdir())
