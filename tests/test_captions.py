"""Pure caption rules: file name -> caption, templates, safe file names."""

from __future__ import annotations

import pytest

from dbtools.dataset.captions import (
    CAPTION_FILE_FORMATS,
    TEMPLATE_CAPTION_ONLY,
    TEMPLATE_WITH_PROMPTS,
    apply_template,
    caption_candidates,
    caption_file_name,
    caption_from_filename,
    caption_image_name,
    clean_caption,
    default_template,
    safe_filename_stem,
    template_problems,
)


@pytest.mark.parametrize("name, caption", [
    ("red_car_3.png", "red car"),                 # underscores inside are content
    ("a red car_3.png", "a red car"),             # EveryDream `filename` format
    ("00012@a dog.jpg", "a dog"),                 # mrwho / joepenna prefix
    ("a cat (2).png", "a cat"),                   # duplicate marker
    ("a cat_3 (2).png", "a cat"),
    ("a_b_c_12.JPG", "a b c"),
    ("photo.webp", "photo"),
    ("Big Sky.TIFF", "Big Sky"),
    ("v1.5 model.png", "v1.5 model"),             # only the last dot is the extension
    ("  spaced   out _4.png", "spaced out"),
    ("2023@_9.png", ""),                          # nothing left
    ("12345.png", "12345"),                       # digits alone are a caption
    ("dir/sub/a_dog_1.png", "a dog"),
])
def test_caption_from_filename(name, caption):
    assert caption_from_filename(name) == caption


def test_default_template_and_methods():
    assert default_template() == TEMPLATE_CAPTION_ONLY == "{caption}"
    assert default_template("sks") == default_template("", "a car") == TEMPLATE_WITH_PROMPTS


@pytest.mark.parametrize("ip, cp, text", [
    ("sks", "a car", "sks, red car, a car"),
    ("sks", "", "sks, red car"),
    ("", "a car", "red car, a car"),
    ("", "", "red car"),
    ("  sks ", " a car ", "sks, red car, a car"),
])
def test_apply_template_drops_empty_parts(ip, cp, text):
    assert apply_template(TEMPLATE_WITH_PROMPTS, "red car", ip, cp) == text


def test_apply_template_custom():
    assert apply_template("{caption} in the style of {instance_prompt}", "a cat", "sks") == \
        "a cat in the style of sks"
    assert apply_template("{instance_prompt}, {caption}", "", "sks") == "sks"


def test_template_problems():
    assert template_problems("{caption}, {instance_prompt}, {class_prompt}") == []
    assert template_problems("literal {{braces}} {caption}") == []
    assert "unknown field" in template_problems("{caption} {style}")[0]
    assert "malformed" in template_problems("{caption")[0]


def test_clean_caption():
    assert clean_caption("  a\tcat\n on\x00 a mat\u200b ") == "a cat on a mat"


@pytest.mark.parametrize("caption, expected", [
    ("a/b\\c", "a b c"),                 # separators
    ("../../etc/passwd", "etc passwd"),  # no way out of the folder
    ('a<b>c:d"e|f?g*h', "a b c d e f g h"),
    ("line\nbreak\x07bell", "line break bell"),
    ("ends with dots...", "ends with dots"),
    ("con", "_con"), ("NUL", "_NUL"), ("com1.tar", "_com1.tar"), ("LPT9", "_LPT9"),
    ("", "untitled"), ("...", "untitled"), ("///", "untitled"),
])
def test_safe_filename_stem(caption, expected):
    assert safe_filename_stem(caption) == expected


def test_safe_filename_stem_length_in_bytes():
    stem = safe_filename_stem("a" * 400, suffix="_12.png")
    assert len((stem + "_12.png").encode()) == 255
    # Multi-byte characters are never cut in half.
    stem = safe_filename_stem("猫" * 200, suffix=".png")
    data = (stem + ".png").encode("utf-8")
    assert len(data) <= 255 and data.decode("utf-8") and set(stem) == {"猫"}
    emoji = safe_filename_stem("🐈" * 100, suffix=".jpg", max_bytes=50)
    assert len((emoji + ".jpg").encode()) <= 50 and set(emoji) == {"🐈"}


def test_caption_file_names_come_from_one_table():
    names = [caption_file_name("v1.2 car.JPG", f) for f in ("sidecar", "txt", "text", "stem", "caption")]
    assert names == ["v1.2 car.JPG.txt", "v1.2 car.txt", "v1.2 car.txt", "v1.2 car.txt", "v1.2 car.caption"]
    assert caption_file_name("a red car_3.png") == "a red car_3.png.txt"  # the default: sidecar
    assert [caption_file_name("a.png", f) for f in ("filename", "mrwho", "joepenna")] == [None] * 3
    with pytest.raises(ValueError, match="unknown caption format 'png'"):
        caption_file_name("a.png", "png")
    # training looks for the sidecar first (`--read_prompts_from_txts`), then the stem files
    assert caption_candidates("a.b.png") == ["a.b.png.txt", "a.b.txt", "a.b.caption"]
    assert caption_image_name("a red car", "filename", 3, ".png") == "a red car_3.png"
    assert caption_image_name("a red car", "joepenna", 3, ".png") == "00003@a red car.png"
    with pytest.raises(ValueError):
        caption_image_name("a red car", "txt", 3, ".png")


@pytest.mark.parametrize("fmt", list(CAPTION_FILE_FORMATS))
def test_every_caption_file_the_tools_write_is_the_one_training_reads(tmp_path, fmt):
    from dbtools.caption.autocaption import CaptionConfig
    from dbtools.train.data import find_caption_file
    from dbtools.ui.editor import caption_path

    image = tmp_path / "a.b.png"
    image.write_bytes(b"")
    assert caption_path(image, fmt) == tmp_path / caption_file_name(image.name, fmt)
    caption_path(image, fmt).write_text("a caption")
    assert find_caption_file(image) == caption_path(image, fmt)
    assert CaptionConfig(format=fmt).format == fmt  # autocaption takes the same format names
