"""The image layer: what counts as an image, and loading any of them as upright RGB."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dbtools.dataset.images import ImageError, has_images, is_image_file, list_images, load_rgb, natural_key, to_rgb


def test_is_image_file_case_insensitive_and_no_junk():
    for name in ("a.jpg", "a.JPG", "b.Jpeg", "c.png", "d.webp", "e.WEBP", "f.gif", "g.bmp",
                 "h.tif", "i.TIFF", "j.tga", "dir/k.png"):
        assert is_image_file(name), name
    for name in ("Thumbs.db", ".DS_Store", "a.png.txt", "a.caption", "._a.png", ".hidden.png",
                 "png", "notes.txt", "model.ckpt"):
        assert not is_image_file(name), name


def test_list_images_filters_junk_and_sorts_naturally(tmp_path, image_factory):
    for name in ("img10.png", "img2.png", "Img1.JPG", "sub/img3.webp", ".ipynb_checkpoints/img0.png",
                 ".dbtools/x.png", "sub/.hidden/y.png"):
        image_factory(tmp_path / name)
    for junk in ("Thumbs.db", ".DS_Store", "img2.png.txt", "img2.caption", "notes.txt"):
        (tmp_path / junk).write_bytes(b"junk")
    (tmp_path / "folder.png").mkdir()  # a folder with an image name
    top = [p.name for p in list_images(tmp_path)]
    assert top == ["Img1.JPG", "img2.png", "img10.png"]
    deep = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)]
    assert deep == ["Img1.JPG", "img2.png", "img10.png", "sub/img3.webp"]
    assert natural_key("a2") < natural_key("a10")


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        list_images(tmp_path / "nope")


def test_has_images(tmp_path, image_factory):
    assert not has_images(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    image_factory(tmp_path / ".ipynb_checkpoints" / "a.png")
    assert not has_images(tmp_path, recursive=True)
    image_factory(tmp_path / "sub" / "b.png")
    assert not has_images(tmp_path) and has_images(tmp_path, recursive=True)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_rgb(tmp_path / "r.jpg")
    assert out.size == (20, 40)
    r, g, b = out.getpixel((10, 2))  # the left edge is now on top
    assert b > 200 and r < 60


def test_palette_and_alpha_modes_composite_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 255, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    out = load_rgb(tmp_path / "rgba.png")
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 255, 0)

    la = Image.new("LA", (4, 4), (0, 128))
    la.save(tmp_path / "la.png")
    assert load_rgb(tmp_path / "la.png").getpixel((0, 0)) == (127, 127, 127)

    p = Image.new("P", (4, 4))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    out = load_rgb(tmp_path / "p.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (0, 0, 255)

    opaque = Image.new("P", (4, 4))
    opaque.putpalette([10, 20, 30] + [0] * 765)
    opaque.save(tmp_path / "opaque.gif")
    assert load_rgb(tmp_path / "opaque.gif").getpixel((2, 2)) == (10, 20, 30)

    pa = Image.new("PA", (4, 4))
    pa.putpalette([0, 0, 255] + [0] * 765)
    assert to_rgb(pa).getpixel((0, 0)) == (255, 255, 255)  # alpha 0 -> white


def test_cmyk_and_grey(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    r, g, b = load_rgb(tmp_path / "c.jpg").getpixel((4, 4))
    assert r > 220 and g < 40 and b < 40
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "w.tif")
    assert load_rgb(tmp_path / "w.tif").getpixel((0, 0)) == (255, 255, 255)
    Image.new("L", (4, 4), 77).save(tmp_path / "l.png")
    assert load_rgb(tmp_path / "l.png").getpixel((0, 0)) == (77, 77, 77)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_rgb(tmp_path / "g16.png")
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    # Raw I;16 and float images too.
    i16 = Image.fromarray(arr)
    assert i16.mode == "I;16"
    assert [to_rgb(i16).getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [to_rgb(f).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = load_rgb(tmp_path / "a.gif")
    assert out.mode == "RGB"
    r, g, b = out.getpixel((4, 4))
    assert r > 200 and g < 50 and b < 50


def test_truncated_and_corrupt_files_name_the_file(tmp_path, image_factory):
    path = image_factory(tmp_path / "cut.jpg", size=(256, 256))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg.*truncated or corrupt"):
        load_rgb(path)
    (tmp_path / "fake.png").write_bytes(b"this is not a png")
    with pytest.raises(ImageError, match="fake.png"):
        load_rgb(tmp_path / "fake.png")
    with pytest.raises(ImageError, match="missing.png.*not found"):
        load_rgb(tmp_path / "missing.png")


def test_decompression_bomb_refused(tmp_path, image_factory):
    path = image_factory(tmp_path / "big.png", size=(100, 100))
    with pytest.raises(ImageError, match="big.png.*pixel safety limit"):
        load_rgb(path, max_pixels=5_000)
    assert load_rgb(path, max_pixels=20_000).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's global limit is never lifted


def test_link_loops_and_dangling_links_do_not_hide_or_fake_images(tmp_path, image_factory):
    folder = tmp_path / "data"
    image_factory(folder / "good.png")
    (folder / "loop.png").symlink_to("loop.png")  # a link to itself: ELOOP when followed
    (folder / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(folder)  # a folder loop
    image_factory(tmp_path / "elsewhere.png")
    (folder / "linked.png").symlink_to(tmp_path / "elsewhere.png")  # a good link stays
    assert has_images(folder) and has_images(folder, recursive=True)
    for recursive in (False, True):
        assert [p.name for p in list_images(folder, recursive=recursive)] == ["good.png", "linked.png"]
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "loop.png").symlink_to("loop.png")
    assert not has_images(only_bad, recursive=True) and list_images(only_bad) == []


def test_unreadable_image_is_permission_denied_not_corrupt(tmp_path, image_factory, monkeypatch):
    path = image_factory(tmp_path / "private.png")
    real_open = Image.open

    def denied(fp, *a, **k):  # tests run as root, where chmod 000 does not stop reading
        if str(fp) == str(path):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(ImageError, match="permission denied") as info:
        load_rgb(path)
    assert "corrupt" not in str(info.value) and str(path) in str(info.value)
