"""Training data: prompts per image, pre-flight problems, buckets, batches, latent cache."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from dbtools.dataset.concepts import Concept
from dbtools.families.base import Components
from dbtools.families.sd import SD1
from dbtools.train.data import (
    BatchStream,
    DataConfig,
    DataPlan,
    DreamBoothData,
    Example,
    LatentCache,
    build_prompt,
    cover_crop_box,
    find_caption_file,
    image_to_array,
    make_buckets,
    nearest_bucket,
    place_items,
    scan_concepts,
    transform_caption,
)


def write_caption(image: Path, text: str, kind: str = "full") -> Path:
    path = {"full": image.with_name(image.name + ".txt"), "stem": image.with_suffix(".txt"),
            "caption": image.with_suffix(".caption")}[kind]
    path.write_text(text, encoding="utf-8")
    return path


def test_caption_file_lookup_prefers_image_name_txt(tmp_path, image_factory):
    img = image_factory(tmp_path / "a red car_3.png")
    assert find_caption_file(img) is None
    write_caption(img, "stem", "caption")
    assert find_caption_file(img).name == "a red car_3.caption"
    write_caption(img, "stem", "stem")
    assert find_caption_file(img).name == "a red car_3.txt"
    write_caption(img, "full", "full")
    assert find_caption_file(img).name == "a red car_3.png.txt"


def test_template_applies_only_when_given():
    concept = Concept("x", instance_prompt="sks", class_prompt="a toy")
    assert build_prompt("a red car", concept, None) == "a red car"
    assert build_prompt("a red car", concept, "{instance_prompt}, {caption}") == "sks, a red car"


def test_scan_reads_captions_ignores_junk_and_applies_concept_template(tmp_path, image_factory):
    inst = tmp_path / "inst"
    a = image_factory(inst / "a.png")
    b = image_factory(inst / "sub" / "b.JPG")
    write_caption(a, "  a red\ncar ")
    write_caption(b, "a blue car", "stem")
    for junk in ("Thumbs.db", ".DS_Store", "notes.caption", "x.png.txt"):
        (inst / junk).write_bytes(b"junk")
    (inst / ".ipynb_checkpoints").mkdir()
    image_factory(inst / ".ipynb_checkpoints" / "c.png")
    concept = Concept(str(inst), instance_prompt="sks", prompt_template="{instance_prompt} {caption}")
    plan, problems = scan_concepts([concept], read_prompts_from_txts=True)
    assert problems == []
    assert [(e.path.name, e.prompt) for e in plan.instance] == [("a.png", "sks a red car"),
                                                                ("b.JPG", "sks a blue car")]
    # The command-line template wins over the concept's.
    plan, _ = scan_concepts([concept], read_prompts_from_txts=True, prompt_template="{caption}")
    assert plan.instance[0].prompt == "a red car"


def test_scan_reports_every_problem_with_file_and_fix(tmp_path, image_factory):
    inst = tmp_path / "inst"
    ok = image_factory(inst / "ok.png")
    write_caption(ok, "fine")
    image_factory(inst / "nocap.png")
    empty = image_factory(inst / "empty.png")
    write_caption(empty, "   \n")
    bad = inst / "broken.png"
    bad.write_bytes(ok.read_bytes()[:60])
    write_caption(bad, "broken")
    (tmp_path / "empty_inst").mkdir()
    concepts = [Concept(str(inst), class_prompt=""),
                Concept(str(tmp_path / "empty_inst"), instance_prompt="x"),
                Concept(str(tmp_path / "missing"), instance_prompt="x"),
                Concept(str(inst), instance_prompt="x", class_prompt="", class_data_dir="")]
    plan, problems = scan_concepts(concepts, read_prompts_from_txts=True, with_prior_preservation=True)
    text = "\n".join(problems)
    assert "nocap.png: no caption file" in text and "python -m dbtools extract" in text
    assert "empty.png.txt: caption file is empty" in text
    assert "broken.png" in text and "truncated or corrupt" in text
    assert "contains no images" in text and "empty_inst" in text
    assert "missing" in text and "not a folder" in text
    assert "class_data_dir" in text
    assert "class_prompt" not in text  # Method 1: an empty class prompt is allowed
    assert not any("Thumbs" in p for p in problems)


def test_scan_without_captions_needs_instance_prompt(tmp_path, image_factory):
    image_factory(tmp_path / "i" / "a.png")
    _, problems = scan_concepts([Concept(str(tmp_path / "i"))])
    assert any("no instance_prompt" in p for p in problems)
    plan, problems = scan_concepts([Concept(str(tmp_path / "i"), instance_prompt="sks dog")])
    assert problems == [] and plan.instance[0].prompt == "sks dog"


def test_transform_caption_dropout_and_shuffle_keep_leading_tokens():
    rng = random.Random(0)
    assert transform_caption("a, b", rng) == "a, b"
    assert transform_caption("a, b", random.Random(0), dropout=1.0) == ""
    seen = {transform_caption("sks, red, car, blue, sky", random.Random(s), shuffle=True, keep_tokens=1)
            for s in range(30)}
    assert len(seen) > 1
    assert all(s.startswith("sks, ") and sorted(s.split(", ")) == sorted("sks, red, car, blue, sky".split(", "))
               for s in seen)


def test_buckets_cover_aspect_ratios_with_step_multiples():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert all(max(w / h, h / w) <= 2.0 for w, h in buckets)
    wide, tall = nearest_bucket(1600, 900, buckets), nearest_bucket(900, 1600, buckets)
    assert wide[0] > wide[1] and tall == (wide[1], wide[0])
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)


def test_cover_crop_fills_target_and_keeps_shape(tmp_path, image_factory):
    from PIL import Image

    size, (left, top) = cover_crop_box((200, 100), (64, 64))
    assert size == (128, 64) and (left, top) == (32, 0)
    size, (left, top) = cover_crop_box((200, 100), (64, 64), random.Random(1))
    assert 0 <= left <= 64 and top == 0
    img = Image.open(image_factory(tmp_path / "x.png", size=(80, 40))).convert("RGB")
    arr = image_to_array(img, (48, 32), cover_crop_box((80, 40), (48, 32)), flip=False)
    flipped = image_to_array(img, (48, 32), cover_crop_box((80, 40), (48, 32)), flip=True)
    assert arr.shape == (3, 32, 48) and arr.min() >= -1 and arr.max() <= 1
    assert np.allclose(arr[:, :, ::-1], flipped)


def test_batch_stream_is_deterministic_and_covers_every_example_each_pass():
    sizes = [(64, 64)] * 5 + [(48, 80)] * 3
    stream = BatchStream(sizes, batch_size=2, seed=7)
    assert len(stream) == 3 + 2
    one_pass = [stream.batch(i) for i in range(len(stream))]
    assert sorted(i for b in one_pass for i in b) == list(range(8))
    assert all(len({sizes[i] for i in b}) == 1 for b in one_pass)  # batches never mix buckets
    again = BatchStream(sizes, batch_size=2, seed=7)
    assert [again.batch(i) for i in range(12, 2, -1)] == [stream.batch(i) for i in range(12, 2, -1)]
    assert [stream.batch(i) for i in range(5, 10)] != one_pass  # each pass reshuffles


def test_dataset_buckets_images_and_wraps_class_stream(tmp_path, image_factory):
    wide = [Example(image_factory(tmp_path / f"w{i}.png", size=(96, 48)), "wide") for i in range(2)]
    square = [Example(image_factory(tmp_path / "s.png", size=(64, 64)), "square")]
    classes = [Example(image_factory(tmp_path / f"c{i}.png", size=(64, 64)), "cls", True) for i in range(5)]
    cfg = DataConfig(resolution=64, bucket_step=16, aspect_ratio_bucketing=True, train_batch_size=1, seed=3)
    data = DreamBoothData(DataPlan(wide + square, classes), cfg)
    sizes = {it.example.prompt: it.size for it in data.instance}
    assert sizes["square"] == (64, 64) and sizes["wide"][0] > sizes["wide"][1]
    assert data.batches_per_epoch == 5  # the longer (class) stream sets the epoch
    batch = data.micro_batch(4)
    w, h = next(it.size for it in data.instance if it.example.prompt == batch["instance"]["prompts"][0])
    assert batch["instance"]["pixels"].shape == (1, 3, h, w)
    assert batch["class"]["prompts"] == ["cls"]
    assert np.array_equal(data.micro_batch(4)["instance"]["pixels"], batch["instance"]["pixels"])


def test_square_mode_crops_everything_to_resolution(tmp_path, image_factory):
    ex = [Example(image_factory(tmp_path / "w.png", size=(96, 48)), "p")]
    items = place_items(ex, DataConfig(resolution=32, bucket_step=16, center_crop=True))
    assert items[0].size == (32, 32) and items[0].box == ((64, 32), (16, 0))


def test_latent_cache_on_disk_skips_encoding_until_the_file_changes(tmp_path, image_factory):
    path = image_factory(tmp_path / "a.png", size=(32, 32))
    items = place_items([Example(path, "p")], DataConfig(resolution=32, bucket_step=16, center_crop=True))
    calls = []

    def encode(pixels):
        calls.append(len(pixels))
        n = len(pixels)
        return np.full((n, 4, 4, 4), 0.5, np.float32), np.full((n, 4, 4, 4), 0.1, np.float32)

    first = LatentCache("model-a", tmp_path / "cache")
    first.fill(items, (False, True), encode, progress=False)
    assert calls == [2] and first.encoded == 2
    second = LatentCache("model-a", tmp_path / "cache")
    second.fill(items, (False, True), encode, progress=False)
    assert calls == [2] and second.read_from_disk == 2
    mean, std = second.get(items[0], True)
    assert mean.shape == (4, 4, 4) and float(std[0, 0, 0]) == pytest.approx(0.1)
    LatentCache("model-b", tmp_path / "cache").fill(items, (False,), encode, progress=False)
    assert calls == [2, 1]  # another model never reuses these latents
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    LatentCache("model-a", tmp_path / "cache").fill(items, (False,), encode, progress=False)
    assert calls == [2, 1, 1]  # an edited image is encoded again
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


def test_held_out_images_leave_the_training_plan(tmp_path, image_factory):
    from dbtools.train.data import DataPlan, DreamBoothData, with_validation

    inst = tmp_path / "inst"
    for i in range(10):
        image_factory(inst / f"img{i}.png")
        (inst / f"img{i}.png.txt").write_text(f"caption {i}")
    concepts = [Concept(str(inst), "sks")]
    plan, problems = scan_concepts(concepts, read_prompts_from_txts=True)
    assert not problems and len(plan.instance) == 10
    split, problems = with_validation(plan, concepts, validation_split=0.2, seed=3)
    again, _ = with_validation(plan, concepts, validation_split=0.2, seed=3)
    assert not problems and split == again  # deterministic
    assert len(split.validation) == 2 and len(split.instance) == 8
    held = {e.path for e in split.validation}
    assert held.isdisjoint(e.path for e in split.instance)
    assert {e.prompt for e in split.validation} <= {f"caption {i}" for i in range(10)}
    # no micro-batch of a whole epoch (and more) ever holds a held-out image
    data = DreamBoothData(split, DataConfig(resolution=16, train_batch_size=3, seed=3))
    seen = {it.example.path for i in range(3 * data.batches_per_epoch)
            for it in (data.instance[k] for k in data.instance_stream.batch(i))}
    assert seen == {e.path for e in split.instance}
    # a held-out folder is read like instance data; both sources at once, or a bad folder, are problems
    val = tmp_path / "val"
    image_factory(val / "v.png")
    (val / "v.png.txt").write_text("held out")
    plan2, problems = with_validation(plan, concepts, validation_data_dir=str(val), read_prompts_from_txts=True)
    assert not problems and [(e.path.name, e.prompt) for e in plan2.validation] == [("v.png", "held out")]
    assert plan2.instance == plan.instance
    assert "both given" in with_validation(plan, concepts, validation_data_dir=str(val), validation_split=0.1)[1][0]
    assert "not a folder" in with_validation(plan, concepts, validation_data_dir=str(tmp_path / "no"))[1][0]
    assert "at least 2" in with_validation(DataPlan(plan.instance[:1], []), concepts, validation_split=0.5)[1][0]


# --------------------------------------------------------------------------- what reaches the model


def _class_prompt_data(tmp_path, image_factory, **cfg) -> DreamBoothData:
    inst = [Example(image_factory(tmp_path / f"i{i}.png", size=(32, 32)), f"sks toy, red, round, number {i}")
            for i in range(3)]
    classes = [Example(image_factory(tmp_path / f"c{i}.png", size=(32, 32)), CLASS_PROMPT, True) for i in range(2)]
    return DreamBoothData(DataPlan(inst, classes), DataConfig(resolution=32, bucket_step=16, seed=5, **cfg))


CLASS_PROMPT = " a photo of a toy ,red,  round "  # commas and odd spaces: any rewrite shows


@pytest.mark.parametrize("cfg", [dict(caption_dropout=1.0), dict(shuffle_captions=True),
                                 dict(caption_dropout=0.5, shuffle_captions=True, keep_tokens=1)])
def test_caption_dropout_and_shuffle_touch_instance_captions_only(tmp_path, image_factory, cfg):
    data = _class_prompt_data(tmp_path, image_factory, **cfg)
    batches = [data.micro_batch(i) for i in range(24)]
    assert {p for b in batches for p in b["class"]["prompts"]} == {CLASS_PROMPT}
    originals = {it.example.prompt for it in data.instance}
    changed = [p for b in batches for p in b["instance"]["prompts"] if p not in originals]
    assert changed  # the instance captions were dropped or shuffled


def test_class_prompts_reach_the_text_encoder_exactly_as_given(tmp_path, image_factory):
    """Through `train.compute_loss`: the prompts handed to the prompt encoder for a batch
    with caption dropout on are the dropped instance caption and the class prompt as written."""
    from types import SimpleNamespace

    import torch

    from dbtools.train import loop as T

    data = _class_prompt_data(tmp_path, image_factory, caption_dropout=1.0)
    data.cache = LatentCache("k")
    data.cache.fill(data.all_items(), (False,), lambda px: (px[:, :, ::8, ::8], px[:, :, ::8, ::8] * 0),
                    progress=False)
    seen = []

    class Encoded(Exception):
        """The prompts are all this test needs: the step stops there."""

    class Encoder:
        def encode(self, prompts, encoders, device):
            seen.append(prompts)
            raise Encoded

    run = SimpleNamespace(batches=SimpleNamespace(get=data.micro_batch), seed=1, prompts=Encoder(),
                          accelerator=SimpleNamespace(device=torch.device("cpu")),
                          models=Components(SD1, dict(vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=1.0)),
                                                      text_encoder=object()), noise_scheduler=None))
    for micro in range(4):
        with pytest.raises(Encoded):
            T.compute_loss(run, micro)
    assert seen == [["", CLASS_PROMPT]] * 4


# --------------------------------------------------------------------------- latent cache keys


def _pixel_encoder(calls: list):
    """A stand-in VAE whose latents are a function of the pixels (so a wrong entry shows)."""
    def encode(pixels):
        calls.append(len(pixels))
        mean = pixels[:, :, ::8, ::8].copy()
        return mean, np.abs(mean) + 0.01
    return encode


def test_latent_cache_never_serves_the_unflipped_latent_for_a_flipped_item(tmp_path, image_factory):
    from dbtools.train.data import load_item

    path = image_factory(tmp_path / "a.png", size=(48, 32))  # not mirror-symmetric
    (item,) = place_items([Example(path, "p")], DataConfig(resolution=32, bucket_step=16, center_crop=True))
    calls: list[int] = []
    encode = _pixel_encoder(calls)
    expected = {flip: encode(load_item(item, flip)[None])[0][0] for flip in (False, True)}
    calls.clear()
    assert not np.array_equal(expected[False], expected[True])
    memory = LatentCache("vae", tmp_path / "cache")
    memory.fill([item], (False, True), encode, progress=False)
    disk = LatentCache("vae", tmp_path / "cache")
    disk.fill([item], (True, False), encode, progress=False)  # asked in the other order, read from disk
    assert calls == [2] and disk.read_from_disk == 2
    for cache in (memory, disk):
        for flip in (False, True):
            assert np.array_equal(cache.get(item, flip)[0], expected[flip]), (cache is disk, flip)


def test_latent_cache_key_covers_flip_crop_bucket_vae_and_image_content(tmp_path, image_factory):
    import dataclasses

    from dbtools.train.data import latent_key

    path = image_factory(tmp_path / "a.png", size=(48, 32))
    (item,) = place_items([Example(path, "p")], DataConfig(resolution=32, bucket_step=16))
    (resized, (left, top)) = item.box
    variants = {"base": latent_key("vae", item, False), "flip": latent_key("vae", item, True),
                "vae": latent_key("other vae", item, False),
                "crop": latent_key("vae", dataclasses.replace(item, box=(resized, (left + 1, top))), False),
                "resize": latent_key("vae", dataclasses.replace(item, box=((60, 40), (left, top))), False),
                "bucket": latent_key("vae", dataclasses.replace(item, size=(32, 16)), False)}
    image_factory(path, size=(48, 32), color=(0, 0, 250))  # new content, same size
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    variants["content"] = latent_key("vae", item, False)
    assert len(set(variants.values())) == len(variants), variants
    # and through the cache: a crop of its own is encoded, never served from the other crop
    calls: list[int] = []
    cache = LatentCache("vae", tmp_path / "cache")
    other_crop = dataclasses.replace(item, box=(resized, (resized[0] - 32, top)))
    cache.fill([item, other_crop], (False,), _pixel_encoder(calls), progress=False)
    assert calls == [2] and not np.array_equal(cache.get(item, False)[0], cache.get(other_crop, False)[0])


# --------------------------------------------------------------------------- EXIF rotation


def test_exif_rotated_images_are_bucketed_cropped_and_encoded_upright(tmp_path, image_factory):
    from PIL import Image

    from dbtools.train.data import item_time_ids, load_item

    upright = image_factory(tmp_path / "upright.png", size=(32, 64))  # tall as the camera saw it
    stored = Image.open(upright).transpose(Image.Transpose.ROTATE_90)  # lying on its side in the file
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=100, subsampling=0)
    Image.open(upright).save(tmp_path / "plain.jpg", quality=100, subsampling=0)
    assert Image.open(tmp_path / "rotated.jpg").size == (64, 32)
    cfg = DataConfig(resolution=64, bucket_step=16, aspect_ratio_bucketing=True)
    rotated, plain = place_items([Example(tmp_path / "rotated.jpg", "p"), Example(tmp_path / "plain.jpg", "p")],
                                 cfg)
    assert rotated.original == (32, 64) and rotated.size[0] < rotated.size[1]
    assert (rotated.size, rotated.box) == (plain.size, plain.box)
    assert item_time_ids(rotated, False) == item_time_ids(plain, False)
    pixels = load_item(rotated, False)
    assert pixels.shape == (3, rotated.size[1], rotated.size[0])
    assert np.abs(pixels - load_item(plain, False)).max() < 0.1  # JPEG round trip, same orientation
    calls: list[int] = []
    cache = LatentCache("vae")
    cache.fill([rotated, plain], (False,), _pixel_encoder(calls), progress=False)
    assert np.abs(cache.get(rotated, False)[0] - cache.get(plain, False)[0]).max() < 0.1


# --------------------------------------------------------------------------- class captions


def test_class_captions_go_through_the_caption_reader(tmp_path, image_factory):
    """Like instance captions: UTF-16 with a mark reads, latin-1 is named with how to re-save it."""
    from dbtools.core.textio import CaptionEncodingError
    from dbtools.train.data import concept_class_examples

    inst, cls = tmp_path / "inst", tmp_path / "cls"
    image_factory(inst / "i.png")
    (inst / "i.png.txt").write_text("sks toy", encoding="utf-8")
    good, bad, bare = (image_factory(cls / f"{n}.png") for n in ("good", "bad", "bare"))
    Path(f"{good}.txt").write_bytes("café crème".encode("utf-16"))
    Path(f"{bad}.txt").write_bytes("café crème".encode("latin-1"))
    concept = Concept(str(inst), "sks toy", class_prompt="a toy", class_data_dir=str(cls))
    plan, problems = scan_concepts([concept], read_prompts_from_txts=True, with_prior_preservation=True)
    assert sorted((e.path.name, e.prompt) for e in plan.classes) == [("bare.png", "a toy"),
                                                                      ("good.png", "café crème")]
    assert len(problems) == 1 and f"{bad}.txt" in problems[0] and "save it as UTF-8" in problems[0]
    with pytest.raises(CaptionEncodingError, match="bad.png.txt"):
        concept_class_examples(concept, read_prompts_from_txts=True)
    Path(f"{bad}.txt").write_text("café crème", encoding="utf-8")
    assert {e.prompt for e in concept_class_examples(concept, True)} == {"a toy", "café crème"}
