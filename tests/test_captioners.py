"""Florence-2, the WD14-style tagger and the instruction VLM on tiny offline models,
through the same caption command as BLIP (formats, bad files, EXIF, undo, flags)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dbtools import cli
from dbtools.caption import autocaption as ac
from dbtools.caption import captioners as cap
from dbtools.caption.autocaption import CaptionConfig, CaptionError, run_caption
from dbtools.tiny import TAGGER_TAGS, build_tiny_tagger

GOOD = ["a.png", "b.jpg", "c.JPG", "d.webp", "grey.png", "alpha.png", "palette.gif", "turned.jpg"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_florence2, tiny_tagger, tiny_vlm) -> dict[str, Path]:
    return {"florence2": tiny_florence2, "tagger": tiny_tagger, "vlm": tiny_vlm}


@pytest.fixture(scope="module")
def loaded(tiny):
    return {family: ac.load_captioner(str(path)) for family, path in tiny.items()}


def exif_turned(path: Path, size=(60, 20)) -> Path:
    """A JPEG stored landscape with EXIF orientation 6: upright it is portrait."""
    img = Image.new("RGB", size, (30, 160, 60))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif)
    return path


@pytest.fixture
def images(tmp_path, image_factory) -> Path:
    """Good images in odd modes (grey, alpha, palette GIF, EXIF-rotated), a truncated
    JPEG and files that are not images."""
    d = tmp_path / "imgs"
    for i, name in enumerate(GOOD[:4]):
        image_factory(d / name, color=(40 * i, 200 - 40 * i, 90))
    image_factory(d / "grey.png", mode="L")
    image_factory(d / "alpha.png", mode="RGBA")
    image_factory(d / "palette.gif", mode="P")
    exif_turned(d / "turned.jpg")
    bad = image_factory(d / "broken.jpg", size=(64, 64))
    bad.write_bytes(bad.read_bytes()[:200])
    (d / "notes.txt").write_text("not an image")
    return d


def fast(img_dir, **kw) -> CaptionConfig:
    base = dict(img_dir=img_dir, num_beams=1, min_length=1, max_length=4, batch_size=3, num_workers=0)
    return CaptionConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- every family


@pytest.mark.parametrize("family", ["florence2", "tagger", "vlm"])
def test_family_is_read_from_the_model_files(tiny, loaded, family):
    assert cap.detect_family(str(tiny[family])) == family and loaded[family].kind == family


@pytest.mark.parametrize("family", ["florence2", "tagger", "vlm"])
def test_every_format_originals_untouched_broken_file_named(loaded, images, tmp_path, family):
    captioner = loaded[family]
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    for fmt in ac.FORMATS:
        out = tmp_path / fmt
        summary = run_caption(fast(images, out_dir=out, format=fmt, prefix="sks, "), captioner, progress=False)
        assert [p.name for p, _ in summary.failed] == ["broken.jpg"]
        assert sorted(r.source.name for r in summary.written) == sorted(GOOD)
        assert all(r.caption.startswith("sks, ") and len(r.caption) > 5 for r in summary.written)
        names = sorted(p.name for p in out.iterdir() if p.is_file())
        if fmt in ac.FILENAME_FORMATS:
            assert len(names) == len(GOOD)
            assert all(re.fullmatch(r"\d{5}@sks, .+" if fmt != "filename" else r"sks, .+_\d+\.\w+", n)
                       for n in names)
        else:
            assert len([n for n in names if n.endswith((".txt", ".caption"))]) == len(GOOD)
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


@pytest.mark.parametrize("family", ["florence2", "tagger", "vlm"])
def test_in_place_rename_and_undo(loaded, images, family):
    (images / "broken.jpg").unlink()
    before = sorted(p.name for p in images.iterdir())
    summary = run_caption(fast(images, out_dir=images), loaded[family], progress=False)
    assert summary.ok and {r.action for r in summary.written} == {"renamed"}
    ac.undo_renames(summary.renames_log)
    assert sorted(p.name for p in images.iterdir() if p.is_file()) == before


def test_exif_rotation_reaches_the_captioner(loaded, images, tmp_path, monkeypatch):
    tagger = loaded["tagger"]
    seen = {}
    real = cap.SquareBGR.__call__

    def spy(self, image):
        seen[image.size] = True
        return real(self, image)

    monkeypatch.setattr(cap.SquareBGR, "__call__", spy)
    run_caption(fast(images, out_dir=tmp_path / "o", format="sidecar"), tagger, progress=False)
    assert (20, 60) in seen and (60, 20) not in seen  # upright, as the EXIF tag says


@pytest.mark.parametrize("family", ["florence2", "vlm"])
def test_batched_captions_equal_one_by_one(loaded, images, tmp_path, family):
    one = run_caption(fast(images, out_dir=tmp_path / "1", format="sidecar", batch_size=1),
                      loaded[family], progress=False)
    many = run_caption(fast(images, out_dir=tmp_path / "4", format="sidecar", batch_size=4),
                       loaded[family], progress=False)
    assert [r.caption for r in one.written] == [r.caption for r in many.written]


def test_cli_runs_each_family_and_exits_1_on_a_broken_file(tiny, images, tmp_path, capsys):
    for family, path in tiny.items():
        argv = ["--img_dir", str(images), "--out_dir", str(tmp_path / family), "--model", str(path),
                "--format", "txt", "--num_beams", "1", "--max_length", "4", "--num_workers", "0"]
        assert ac.main(argv) == 1
        out = capsys.readouterr().out
        assert f"captioned {len(GOOD)} image(s)" in out and "FAILED" in out and "broken.jpg" in out


def test_unknown_model_folder_is_a_clear_error(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CaptionError, match="not a captioner dbtools knows.*Florence-2.*tagger"):
        cap.detect_family(str(tmp_path / "bert"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionError, match="cannot load captioning model.*selected_tags.csv"):
        ac.load_captioner(str(tmp_path / "empty"))
    assert cli.main(["caption", "--img_dir", str(tmp_path), "--model", str(tmp_path / "bert")]) == 2


# ----------------------------------------------------------------------------- Florence-2


def test_florence2_task_token_reaches_the_model_and_boilerplate_goes(tiny, loaded, images, tmp_path,
                                                                     monkeypatch):
    f2, f2_path = loaded["florence2"], tiny["florence2"]
    seen = []
    real = f2.model.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return real(**kwargs)

    monkeypatch.setattr(f2.model, "generate", spy)
    for task in cap.FLORENCE2_TASKS:
        run_caption(fast(images, out_dir=tmp_path / task.strip("<>"), prompt=task, batch_size=16), f2,
                    progress=False)
    question = f2.processor.tokenizer("Describe in detail what is shown in the image.",
                                      add_special_tokens=False)["input_ids"]
    default = f2.prompt_inputs(cap.FLORENCE2_DEFAULT_TASK, 1)["input_ids"][0].tolist()
    assert seen[1] == default and _contains(default, question)
    assert len({tuple(s) for s in seen}) == 3
    with pytest.raises(CaptionError, match="task token"):
        run_caption(fast(images, out_dir=tmp_path / "x", prompt="<OD>"), f2, progress=False)
    monkeypatch.setattr(ac, "load_captioner", lambda *a, **k: pytest.fail("loaded a model for a bad --prompt"))
    assert cli.main(["caption", "--img_dir", str(images), "--model", str(f2_path), "--prompt", "describe it"]) == 2
    assert cap.strip_boilerplate("The image shows a red car on a road.") == "a red car on a road."
    assert cap.strip_boilerplate("In this image we can see a cat.") == "a cat."
    assert cap.strip_boilerplate("The image is NASA's logo") == "NASA's logo"
    assert cap.strip_boilerplate("A dog") == "A dog"


def _contains(seq: list[int], part: list[int]) -> bool:
    return any(seq[i:i + len(part)] == part for i in range(len(seq) - len(part) + 1))


# ----------------------------------------------------------------------------- tagger

NAMES = [n for n, _ in TAGGER_TAGS]


def logits_for(probs: dict[str, float]) -> list[float]:
    """Bias per tag so that the tiny tagger outputs exactly `probs` (others 0.01)."""
    p = np.array([probs.get(n, 0.01) for n in NAMES], dtype=np.float64)
    return list(np.log(p / (1 - p)))


KNOWN = {"general": 0.2, "sensitive": 0.7, "questionable": 0.05, "solo": 0.9, "long_hair": 0.6,
         "^_^": 0.5, "watercolor_(medium)": 0.4, "smile": 0.34, "hatsune_miku": 0.86,
         "kirisame_marisa": 0.84, "sky": 0.36}


@pytest.fixture(scope="module")
def exact_tagger(tmp_path_factory):
    return ac.load_captioner(str(build_tiny_tagger(tmp_path_factory.mktemp("t") / "wd", logits=logits_for(KNOWN))))


def test_tagger_threshold_ratings_exclusion_and_underscores(exact_tagger, images, tmp_path):
    (images / "broken.jpg").unlink()

    def tags(**kw):
        summary = run_caption(fast(images, out_dir=tmp_path / str(len(list(tmp_path.iterdir()))),
                                   format="sidecar", **kw), exact_tagger, progress=False)
        assert {r.caption for r in summary.written} == {summary.written[0].caption}  # same for all
        return summary.written[0].caption

    assert tags() == "solo, hatsune miku, long hair, ^_^, watercolor (medium), sky"
    assert tags(include_ratings=True) == "solo, hatsune miku, sensitive, long hair, ^_^, watercolor (medium), sky"
    assert tags(threshold=0.5, character_threshold=0.8) == "solo, hatsune miku, kirisame marisa, long hair, ^_^"
    assert tags(exclude_tags="long_hair, Watercolor (medium), ^_^") == "solo, hatsune miku, sky"


def test_tagger_with_nothing_above_threshold_is_reported(exact_tagger, images, tmp_path):
    summary = run_caption(fast(images, out_dir=tmp_path / "o", format="sidecar", threshold=0.99,
                               character_threshold=0.99, prefix="sks, "), exact_tagger, progress=False)
    assert summary.written == [] and all("--threshold" in why for p, why in summary.failed if p.name != "broken.jpg")


def test_tagger_preprocessing_pads_white_and_uses_bgr():
    red = Image.new("RGB", (20, 10), (255, 0, 0))
    arr = cap.SquareBGR(32)(red)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.float32
    assert arr[0, 16].tolist() == [255.0, 255.0, 255.0]  # padding on top is white
    assert arr[16, 16].tolist() == [0.0, 0.0, 255.0]  # red in BGR order


def test_tagger_input_size_is_read_from_the_model(tmp_path):
    tagger = ac.load_captioner(str(build_tiny_tagger(tmp_path / "wd48", size=48)))
    assert tagger.size == 48 and tagger.preprocess(Image.new("RGB", (5, 7))).shape == (48, 48, 3)


def test_select_tags_rules_are_pure():
    tags = [cap.Tag("general", 9), cap.Tag("explicit", 9), cap.Tag("o_o", 0), cap.Tag("blue_sky", 0),
            cap.Tag("some_char", 4)]
    probs = [0.3, 0.6, 0.4, 0.9, 0.9]
    assert cap.select_tags(probs, tags, cap.TagRules()) == ["blue sky", "some char", "o_o"]
    assert cap.select_tags(probs, tags, cap.TagRules(include_ratings=True))[2] == "explicit"
    assert cap.display_tag(">_<") == ">_<" and cap.display_tag("x_x") == "x_x"
    assert cap.display_tag("looking_at_viewer") == "looking at viewer"


def test_tags_with_a_caption_in_one_pass(tiny, exact_tagger, images, tmp_path, capsys):
    argv = ["--img_dir", str(images), "--out_dir", str(tmp_path / "both"), "--model", str(tiny["tagger"]),
            "--tags_with", str(tiny["florence2"]), "--format", "sidecar", "--num_beams", "1",
            "--max_length", "4", "--num_workers", "0"]
    assert ac.main(argv) == 1  # broken.jpg
    florence = ac.load_captioner(str(tiny["florence2"]))
    both = cap.TagsWithCaption(exact_tagger, florence)
    summary = run_caption(fast(images, out_dir=tmp_path / "exact", format="sidecar"), both, progress=False)
    alone = run_caption(fast(images, out_dir=tmp_path / "alone", format="sidecar"), florence, progress=False)
    for combined, caption in zip(summary.written, alone.written):
        assert combined.caption == f"{caption.caption}, solo, hatsune miku, long hair, ^_^, watercolor (medium), sky"
    with pytest.raises(CaptionError, match="must then be a tagger"):
        ac.load_captioner(str(tiny["vlm"]), tags_with=str(tiny["florence2"]))


def test_flags_of_other_families_are_ignored_with_one_note(loaded, images, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dbtools.caption.autocaption"):
        run_caption(fast(images, out_dir=tmp_path / "t", max_length=12, num_beams=4, format="txt"),
                    loaded["tagger"], progress=False)
        run_caption(fast(images, out_dir=tmp_path / "v", threshold=0.5, format="txt"),
                    loaded["vlm"], progress=False)
    notes = [r.getMessage() for r in caplog.records if "accepted and ignored" in r.getMessage()]
    assert len(notes) == 2
    assert "--max_length" in notes[0] and "--num_beams" in notes[0] and "tagger" in notes[0]
    assert notes[1].startswith("--threshold") and "vlm" in notes[1]


# ----------------------------------------------------------------------------- VLM


def test_vlm_instruction_reaches_the_chat_template(loaded, images, tmp_path, monkeypatch):
    vlm = loaded["vlm"]
    seen = []
    real = vlm.model.generate

    def spy(**kwargs):
        seen.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(vlm.model, "generate", spy)
    instruction = "Describe the art style in one sentence."
    run_caption(fast(images, out_dir=tmp_path / "o", prompt=instruction, batch_size=4), vlm, progress=False)
    tok = vlm.processor.tokenizer
    ids = seen[0]["input_ids"][0].tolist()
    assert _contains(ids, tok(" " + instruction, add_special_tokens=False)["input_ids"])
    assert ids[-len(tok("Assistant:")["input_ids"]):] == tok("Assistant:")["input_ids"]
    assert ids.count(vlm.model.config.image_token_id) == 4  # the image went in through the template
    assert sum(s["input_ids"].shape[0] for s in seen) == len(GOOD) and seen[0]["max_new_tokens"] == 4


def test_vlm_batches_pad_on_the_left(loaded, monkeypatch):
    vlm = loaded["vlm"]
    # With image splitting (as SmolVLM does), a wide image takes more tokens than a small one.
    monkeypatch.setattr(vlm.processor.image_processor, "do_image_splitting", True)
    monkeypatch.setattr(vlm.processor.image_processor, "size", {"longest_edge": 64})
    mask = vlm.inputs([Image.new("RGB", (64, 32)), Image.new("RGB", (16, 16))], "x")["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # padding before the shorter prompt, not after


def test_quantize_needs_cuda(tiny):
    with pytest.raises(CaptionError, match="needs a CUDA GPU"):
        ac.load_captioner(str(tiny["vlm"]), device="cpu", quantize="4bit")
