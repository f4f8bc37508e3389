"""Auto-captioning on tiny BLIP / BLIP-2 models and generated images (with bad files)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from dbtools import cli
from dbtools.caption import autocaption as ac
from dbtools.caption.autocaption import CaptionConfig, CaptionError, run_caption
from dbtools.dataset.captions import caption_file_name, caption_from_filename, caption_image_name

GOOD = ["a.png", "b.jpg", "c.JPG", "d.webp"]  # top level; sub/e.png is the recursive one


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def blip(tiny_blip):
    return ac.load_captioner(str(tiny_blip))


@pytest.fixture(scope="module")
def blip2(tiny_blip2):
    return ac.load_captioner(str(tiny_blip2))


@pytest.fixture
def images(tmp_path, image_factory) -> Path:
    """Four good images, a truncated JPEG, junk files and a sub-folder."""
    make_image = image_factory
    d = tmp_path / "imgs"
    for i, name in enumerate(GOOD):
        make_image(d / name, color=(40 * i, 200 - 40 * i, 90))
    bad = make_image(d / "broken.jpg", size=(64, 64))
    bad.write_bytes(bad.read_bytes()[:200])
    (d / "notes.txt").write_text("not an image")
    (d / "Thumbs.db").write_bytes(b"\x00junk")
    make_image(d / "sub" / "e.png", color=(10, 10, 250))
    return d


def fast(img_dir, **kw) -> CaptionConfig:
    """A config that keeps the tiny models quick: 2 beams, short captions (in place
    unless `out_dir` is given)."""
    base = dict(img_dir=img_dir, out_dir=img_dir, num_beams=2, min_length=2, max_length=6, batch_size=3, num_workers=0)
    return CaptionConfig(**{**base, **kw})


def fast_argv(img_dir, model, *extra) -> list[str]:
    return ["--img_dir", str(img_dir), "--model", str(model), "--num_beams", "2",
            "--min_length", "2", "--max_length", "6", "--num_workers", "0", *extra]


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha1 of every file (outside .dbtools)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".dbtools" not in p.parts}


# ----------------------------------------------------------------------------- pure rules


def test_generation_kwargs_follow_everydream_flags():
    beam = ac.generation_kwargs(CaptionConfig(q_factor=1.3, min_length=22, max_length=48, num_beams=16))
    assert beam == {"do_sample": False, "num_beams": 16, "repetition_penalty": 1.3,
                    "min_new_tokens": 22, "max_new_tokens": 48}
    nucleus = ac.generation_kwargs(CaptionConfig(nucleus=True, q_factor=0.9))
    assert nucleus["do_sample"] is True and nucleus["top_p"] == 0.9 and nucleus["num_beams"] == 1
    assert "repetition_penalty" not in nucleus


def test_config_problems_are_all_listed():
    cfg = CaptionConfig(format="png", nucleus=True, q_factor=0, min_length=50, max_length=48, batch_size=0)
    problems = "\n".join(ac.config_problems(cfg))
    for needle in ("--format 'png'", "--q_factor 0", "--min_length 50", "--batch_size 0"):
        assert needle in problems
    assert ac.config_problems(CaptionConfig()) == []


def test_output_names_are_safe_and_short():
    evil = "../../etc/pass<wd>: a|b?*\x07 " + "é" * 300
    for fmt in ("filename", "mrwho", "joepenna"):
        name = caption_image_name(evil, fmt, 7, ".JPG")
        assert len(name.encode("utf-8")) <= 255
        assert not any(ch in name for ch in '/\\<>:"|?*\x07') and ".." not in name
        assert name.endswith("_7.JPG") if fmt == "filename" else name.startswith("00007@")
        assert caption_from_filename(name).startswith("etc pass wd a b é")
    assert caption_image_name("a red car", "filename", 3, ".png") == "a red car_3.png"
    assert caption_image_name("a red car", "mrwho", 3, ".png") == "00003@a red car.png"


def test_undo_check_handles_a_freed_name_reused_in_the_same_run(tmp_path):
    # x.png -> cat_1.png, then y.png -> x.png (the freed name): undo must go in reverse.
    (tmp_path / "cat_1.png").write_text("was x")
    (tmp_path / "x.png").write_text("was y")
    steps = [(tmp_path / "x.png", tmp_path / "y.png"), (tmp_path / "cat_1.png", tmp_path / "x.png")]
    todo, problems = ac._check_undo(steps)
    assert problems == [] and todo == steps


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ac.FORMATS)
def test_every_format_copies_and_never_touches_originals(blip, images, tmp_path, fmt):
    before = snapshot(images)
    out = tmp_path / "out"
    summary = run_caption(fast(images, out_dir=out, format=fmt), blip, progress=False)

    assert snapshot(images) == before
    assert [p.name for p, _ in summary.failed] == ["broken.jpg"]
    assert "truncated or corrupt" in summary.failed[0][1]
    assert sorted(r.source.name for r in summary.written) == sorted(GOOD)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    for r in summary.written:
        assert r.caption and r.output.parent == out
        if fmt in ac.FILENAME_FORMATS:
            assert r.output.suffix == r.source.suffix  # .JPG stays .JPG, bytes copied as is
            assert r.output.read_bytes() == r.source.read_bytes()
            assert caption_from_filename(r.output.name) == r.caption
        else:
            assert r.output.read_text(encoding="utf-8") == r.caption
            assert (out / r.source.name).read_bytes() == r.source.read_bytes()
    if fmt == "filename":
        assert all(re.fullmatch(r".+_\d+\.(png|jpg|JPG|webp)", f) for f in files)
    elif fmt in ("mrwho", "joepenna"):
        assert all(re.fullmatch(r"\d{5}@.+\.(png|jpg|JPG|webp)", f) for f in files)
    else:
        suffix = {"txt": ".txt", "text": ".txt", "caption": ".caption", "sidecar": ".txt"}[fmt]
        expected = [caption_file_name(n, fmt) for n in GOOD]
        assert sorted(f for f in files if f.endswith(suffix)) == sorted(expected)
        assert sorted(f for f in files if not f.endswith(suffix)) == sorted(GOOD)
    assert not any(n in files for n in ("notes.txt", "Thumbs.db", "broken.jpg"))


def test_prefix_suffix_and_sanitized_names(blip, images, tmp_path):
    out = tmp_path / "out"
    summary = run_caption(fast(images, out_dir=out, prefix="../x/sks style, ", suffix=" " + "ü" * 200,
                               format="filename"), blip, progress=False)
    for r in summary.written:
        assert r.caption.startswith("../x/sks style, ") and r.caption.endswith("ü" * 200)
        assert r.output.parent == out and len(r.output.name.encode("utf-8")) <= 255
        assert r.output.name.startswith("x sks style, ")
    side = run_caption(fast(images, out_dir=tmp_path / "side", prefix="photo of sks, ", suffix=", 4k",
                            format="sidecar"), blip, progress=False)
    text = (tmp_path / "side" / "a.png.txt").read_text(encoding="utf-8")
    assert text.startswith("photo of sks, ") and text.endswith(", 4k")
    assert text[len("photo of sks, "):-len(", 4k")] == blip.caption(
        [images / "a.png"], **ac.generation_kwargs(fast(images)))[0]
    assert side.ok is False  # the broken file is still reported


def test_collisions_get_a_new_index_and_never_overwrite(blip, images, tmp_path):
    first = run_caption(fast(images, out_dir=tmp_path / "one"), blip, progress=False)
    taken = {r.output.name for r in first.written}
    out = tmp_path / "two"
    out.mkdir()
    for name in taken:
        (out / name).write_bytes(b"someone else's file")
    second = run_caption(fast(images, out_dir=out), blip, progress=False)
    assert all((out / n).read_bytes() == b"someone else's file" for n in taken)
    new = {r.output.name for r in second.written}
    assert len(new) == len(GOOD) and not new & taken
    for r in second.written:
        assert caption_from_filename(r.output.name) == r.caption
        assert r.output.read_bytes() == r.source.read_bytes()


def test_stem_clash_in_txt_format_keeps_both_captions_safe(blip, tmp_path, image_factory):
    d = tmp_path / "imgs"
    image_factory(d / "same.png")
    image_factory(d / "same.jpg")
    summary = run_caption(fast(d, format="txt"), blip, progress=False)
    assert len(summary.written) == 1 and len(summary.failed) == 1
    assert "--format sidecar" in summary.failed[0][1]


# ----------------------------------------------------------------------------- re-runs


def test_rerun_skips_done_images_and_overwrite_redoes_them(blip, images, tmp_path):
    out = tmp_path / "out"
    cfg = fast(images, out_dir=out)
    run_caption(cfg, blip, progress=False)
    after_first = snapshot(out)
    again = run_caption(cfg, blip, progress=False)
    assert again.written == [] and sorted(p.name for p in again.skipped) == sorted(GOOD)
    assert snapshot(out) == after_first
    redo = run_caption(fast(images, out_dir=out, overwrite=True), blip, progress=False)
    assert len(redo.written) == len(GOOD) and snapshot(out) == after_first  # same captions, same files
    changed = run_caption(fast(images, out_dir=out, overwrite=True, prefix="new "), blip, progress=False)
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert len(names) == len(GOOD) and all(n.startswith("new ") for n in names)
    assert {r.action for r in changed.written} == {"copied"}


def test_rerun_keeps_hand_edited_caption_files_unless_overwrite(blip, images):
    run_caption(fast(images, format="sidecar"), blip, progress=False)
    (images / "a.png.txt").write_text("my own words")
    again = run_caption(fast(images, format="sidecar"), blip, progress=False)
    assert (images / "a.png.txt").read_text() == "my own words"
    assert again.written == [] and len(again.skipped) == len(GOOD)
    assert len(again.failed) == 1  # the broken image has no caption file, so it is tried again
    run_caption(fast(images, format="sidecar", overwrite=True), blip, progress=False)
    assert (images / "a.png.txt").read_text() != "my own words"


# ----------------------------------------------------------------------------- in place + undo


def test_rename_in_place_then_undo_restores_every_name(blip, tiny_blip, images):
    before = snapshot(images)
    argv = fast_argv(images, tiny_blip, "--format", "filename", "--out_dir", str(images))
    assert ac.main(argv) == 1  # broken.jpg
    after = snapshot(images)
    assert sorted(after.values()) == sorted(before.values())  # same files, nothing lost
    renamed = set(after) - set(before)
    assert len(renamed) == len(GOOD) and all(re.fullmatch(r".+_\d+\.\w+", n) for n in renamed)
    (log,) = sorted((images / ".dbtools").glob("renames-*.jsonl"))
    assert len(log.read_text().splitlines()) == len(GOOD)

    rerun = run_caption(fast(images), blip, progress=False)
    assert rerun.written == [] and len(rerun.skipped) == len(GOOD)  # outputs recognised
    assert snapshot(images) == after

    assert ac.main(["--undo", str(log)]) == 0
    assert snapshot(images) == before
    again = run_caption(fast(images), blip, progress=False)  # after undo they are new again
    assert len(again.written) == len(GOOD)


def test_undo_refuses_when_an_old_name_is_taken(blip, images, capsys):
    summary = run_caption(fast(images), blip, progress=False)
    (images / "a.png").write_bytes(b"new file with the old name")
    state = snapshot(images)
    assert cli.main(["caption", "--undo", str(summary.renames_log)]) == 2
    assert "a.png: exists now" in capsys.readouterr().err
    assert snapshot(images) == state  # nothing was changed
    with pytest.raises(CaptionError, match="no such renames log"):
        ac.undo_renames(images / ".dbtools" / "renames-missing.jsonl")


# ----------------------------------------------------------------------------- folders, CLI


def test_recursive_mirrors_subfolders(blip, images, tmp_path):
    flat = run_caption(fast(images, out_dir=tmp_path / "flat", format="sidecar"), blip, progress=False)
    assert not any("sub" in r.source.parts for r in flat.written)
    out = tmp_path / "deep"
    summary = run_caption(fast(images, out_dir=out, recursive=True, format="sidecar"), blip, progress=False)
    assert (out / "sub" / "e.png.txt").is_file() and (out / "sub" / "e.png").is_file()
    assert len(summary.written) == len(GOOD) + 1
    # an out_dir inside the image folder is not captioned again on the next run
    nested = images / "captioned"
    run_caption(fast(images, out_dir=nested, recursive=True), blip, progress=False)
    rerun = run_caption(fast(images, out_dir=nested, recursive=True), blip, progress=False)
    assert rerun.written == [] and not any("captioned" in p.parts for p in rerun.skipped)


def test_cli_exit_codes_and_summary(tiny_blip, images, tmp_path, capsys, monkeypatch):
    assert ac.main(fast_argv(images, tiny_blip, "--out_dir", str(tmp_path / "o"))) == 1
    out = capsys.readouterr().out
    assert "captioned 4 image(s)" in out and "FAILED" in out and "broken.jpg" in out
    (images / "broken.jpg").unlink()
    assert ac.main(fast_argv(images, tiny_blip, "--out_dir", str(tmp_path / "p"))) == 0

    def no_model(*a, **k):
        raise AssertionError("the model must not load when the flags are wrong")

    monkeypatch.setattr(ac, "load_captioner", no_model)
    assert cli.main(["caption", "--img_dir", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert cli.main(["caption", "--img_dir", str(images), "--nucleus", "--q_factor", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_nucleus_and_beam_flags_reach_generate(blip, images, tmp_path, monkeypatch):
    seen = []
    real = blip.model.generate

    def spy(**kwargs):
        seen.append({k: v for k, v in kwargs.items() if not hasattr(v, "shape")})
        return real(**kwargs)

    monkeypatch.setattr(blip.model, "generate", spy)
    for n, argv in enumerate((["--nucleus", "--q_factor", "0.8"], ["--q_factor", "1.2", "--num_beams", "3"])):
        args = ac.build_parser().parse_args(fast_argv(images, "unused", "--out_dir", str(tmp_path / str(n)),
                                                      "--batch_size", "4", *argv))
        run_caption(ac.config_from_args(args), blip, progress=False)
    nucleus, beam = seen[0], seen[-1]
    assert nucleus == {"do_sample": True, "top_p": 0.8, "num_beams": 1,
                       "min_new_tokens": 2, "max_new_tokens": 6}
    assert beam == {"do_sample": False, "num_beams": 3, "repetition_penalty": 1.2,
                    "min_new_tokens": 2, "max_new_tokens": 6}
    assert len(seen) == 4  # 4 readable images in batches of 4, two runs


def test_worker_processes_give_the_same_captions(blip, images, tmp_path):
    one = run_caption(fast(images, out_dir=tmp_path / "w0", format="sidecar"), blip, progress=False)
    two = run_caption(fast(images, out_dir=tmp_path / "w2", format="sidecar", num_workers=2),
                      blip, progress=False)
    assert [(r.source, r.caption) for r in one.written] == [(r.source, r.caption) for r in two.written]
    assert [p for p, _ in two.failed] == [images / "broken.jpg"]


# ----------------------------------------------------------------------------- models


def test_blip2_processor_expands_image_tokens(blip2):
    proc = blip2.processor
    assert proc.num_query_tokens == blip2.model.config.num_query_tokens
    ids = blip2.prompt_inputs("a photo of", 2)["input_ids"]
    image_id = blip2.model.config.image_token_id
    n = proc.num_query_tokens
    assert ids.shape[0] == 2 and ids[0, :n].tolist() == [image_id] * n and image_id not in ids[0, n:]
    assert ids[0, n].item() == proc.tokenizer.bos_token_id


def test_blip2_captions_through_the_same_path(blip2, tiny_blip2, images, tmp_path):
    summary = run_caption(fast(images, out_dir=tmp_path / "o", format="mrwho"), blip2, progress=False)
    assert len(summary.written) == len(GOOD) and all(r.caption for r in summary.written)
    assert all(re.fullmatch(r"\d{5}@.+", r.output.name) for r in summary.written)
    argv = fast_argv(images, tiny_blip2, "--out_dir", str(tmp_path / "cli"),
                     "--format", "caption")
    assert ac.main(argv) == 1  # broken.jpg
    assert sorted(p.name for p in (tmp_path / "cli").glob("*.caption")) == ["a.caption", "b.caption",
                                                                             "c.caption", "d.caption"]


def test_load_captioner_explains_bad_models(tmp_path):
    with pytest.raises(CaptionError, match="cannot load captioning model"):
        ac.load_captioner(str(tmp_path / "nowhere"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CaptionError, match="not a captioner dbtools knows"):
        ac.load_captioner(str(tmp_path / "bert"))


# ----------------------------------------------------------------------------- EveryDream parity


def test_everydream_flag_forms_parse():
    parse = ac.build_parser().parse_args
    assert parse([]).img_dir == "input" and parse([]).out_dir == "output"
    assert parse([]).nucleus is False and parse(["--nucleus"]).nucleus is True
    assert parse(["--nucleus", "True"]).nucleus is True and parse(["--nucleus", "false"]).nucleus is False
    assert parse(["--torch_device", "cpu"]).device == "cpu"
    with pytest.raises(SystemExit):
        parse(["--nucleus", "maybe"])
    def lengths(argv, family="blip"):
        return ac.length_limits(ac.config_from_args(parse(argv)), family)

    assert lengths(["--max_length", "12"]) == (12, 12) and lengths([]) == (22, 48)
    assert lengths(["--min_length", "5", "--max_length", "12"]) == (5, 12)
    assert lengths([], "florence2") == (0, 256) and lengths(["--max_length", "30"], "vlm") == (0, 30)
    assert ac.config_problems(ac.config_from_args(parse(["--max_length", "12"]))) == []
    nucleus = ac.generation_kwargs(ac.config_from_args(parse(["--nucleus", "--q_factor", "1.3"])))
    assert nucleus["top_p"] == 1.0 and nucleus["do_sample"] is True
    notes = ac.config_notes(ac.config_from_args(parse(["--nucleus", "--q_factor", "1.3"])))
    assert len(notes) == 1 and "no top-p cut" in notes[0]


@pytest.mark.parametrize("extra", [
    [],
    ["--nucleus", "--q_factor", "1.3", "--torch_device", "cpu"],
    ["--nucleus", "True", "--max_length", "4", "--format", "mrwho"],
])
def test_everydream_command_lines_from_a_folder_with_input(tiny_blip, tmp_path, image_factory,
                                                           monkeypatch, extra):
    for name in ("a.png", "b.jpg"):
        image_factory(tmp_path / "input" / name)
    before = snapshot(tmp_path / "input")
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(tiny_blip), "--num_beams", "2", "--num_workers", "0", *extra]
    if "--max_length" not in extra:
        argv += ["--max_length", "5"]  # and no --min_length: the minimum follows
    assert ac.main(argv) == 0
    assert snapshot(tmp_path / "input") == before  # the input is never touched
    outputs = sorted(p.name for p in (tmp_path / "output").iterdir() if p.is_file())
    assert len(outputs) == 2
    pattern = r"\d{5}@.+\.(png|jpg)" if "mrwho" in extra else r".+_[01]\.(png|jpg)"
    assert all(re.fullmatch(pattern, n) for n in outputs)


def test_link_loops_in_the_folder_do_not_crash_captioning(blip, images):
    (images / "loop.png").symlink_to("loop.png")
    (images / "gone.jpg").symlink_to(images / "missing.jpg")
    (images / "sub" / "up").symlink_to(images)
    summary = run_caption(fast(images, format="sidecar", recursive=True), blip, progress=False)
    assert sorted(r.source.name for r in summary.written) == sorted([*GOOD, "e.png"])
    assert [p.name for p, _ in summary.failed] == ["broken.jpg"]


def test_undo_acts_only_inside_the_logs_own_folder(tmp_path):
    root = tmp_path / "out"
    (root / ".dbtools").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("outside")
    (root / "inside.png").write_bytes(b"x")
    log = root / ".dbtools" / "renames-20260101T000000Z.jsonl"
    for entry in ({"from": "../stolen.txt", "to": "../victim.txt"},
                  {"from": "a.png", "to": str(victim)},
                  {"from": ".dbtools/captions.jsonl", "to": "inside.png"}):
        log.write_text(json.dumps(entry) + "\n")
        with pytest.raises(CaptionError, match="outside|points outside"):
            ac.undo_renames(log)
    (root / "linked").symlink_to(tmp_path)  # a sub-folder link that leads out
    log.write_text(json.dumps({"from": "linked/stolen.txt", "to": "linked/victim.txt"}) + "\n")
    with pytest.raises(CaptionError, match="through a link"):
        ac.undo_renames(log)
    assert victim.read_text() == "outside" and not (tmp_path / "stolen.txt").exists()
    assert (root / "inside.png").exists() and not (root / ".dbtools" / "captions.jsonl").exists()


def test_undo_refuses_a_file_that_is_not_one_of_our_logs(tmp_path, capsys):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "hostname").write_text("box\n")
    assert cli.main(["caption", "--undo", str(etc / "hostname")]) == 2
    assert "not a dbtools renames log" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["etc"]  # no .dbtools made anywhere
    fake = tmp_path / "out" / ".dbtools" / "renames-x.jsonl"
    fake.parent.mkdir(parents=True)
    for text in ('{"from": "a", "to": "b", "cmd": "x"}\n', 'not json\n{"from": "a", "to": "b"}\n',
                 '{"from": 1, "to": "b"}\n'):
        fake.write_text(text)
        with pytest.raises(CaptionError, match="not a dbtools renames log"):
            ac.undo_renames(fake)
    assert sorted(p.name for p in fake.parent.iterdir()) == ["renames-x.jsonl"]
