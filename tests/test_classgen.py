"""Class-image generation: only the missing images, deterministic, atomic, junk ignored."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dbtools.dataset.concepts import Concept, write_concepts
from dbtools.families.models import load_pipeline
from dbtools.train.classgen import (
    ClassGenConfig,
    ClassGenError,
    batches,
    count_valid_class_images,
    ensure_class_images,
    free_indices,
    image_index,
    image_seed,
    main,
    missing_per_concept,
)

NAME = re.compile(r"^(\d+)-[0-9a-f]{40}\.jpg$")


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd):
    return load_pipeline(str(tiny_sd))


class CountingLoader:
    """A pipeline loader that counts how often it is called."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, 0

    def __call__(self):
        self.calls += 1
        return self.pipe


@pytest.fixture
def loader(tiny_pipe):
    return CountingLoader(tiny_pipe)


def fast(**kw) -> ClassGenConfig:
    base = dict(num_class_images=3, sample_batch_size=2, seed=7, num_inference_steps=1,
                class_guidance_scale=1.0, height=32, width=32, show_progress=False)
    return ClassGenConfig(**{**base, **kw})


def concept(folder: Path, prompt: str = "a photo of a dog") -> Concept:
    return Concept(instance_data_dir="", class_prompt=prompt, class_data_dir=str(folder))


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- pure rules


def test_free_indices_fill_gaps_first():
    assert free_indices([], 3) == [0, 1, 2]
    assert free_indices([0, 1, 2, 4], 3) == [3, 5, 6]
    assert free_indices([5], 0) == []


def test_batches_keep_the_remainder():
    assert batches([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert batches([], 4) == []


def test_image_seed_depends_on_seed_prompt_and_index():
    a = image_seed(1, "a dog", 0)
    assert a == image_seed(1, "a dog", 0)
    assert len({a, image_seed(2, "a dog", 0), image_seed(1, "a cat", 0), image_seed(1, "a dog", 1)}) == 4
    assert 0 <= a < 2**63


def test_image_index_reads_shivams_names():
    assert image_index("12-" + "a" * 40 + ".jpg") == 12
    assert image_index("photo.jpg") is None


# --------------------------------------------------------------------------- counting


def test_only_images_that_open_are_counted(tmp_path, image_factory):
    d = tmp_path / "class"
    image_factory(d / "good.jpg")
    image_factory(d / "good2.PNG")
    (d / "good.jpg.txt").write_text("a caption")
    (d / "Thumbs.db").write_bytes(b"\x00" * 64)
    (d / ".DS_Store").write_bytes(b"\x00" * 64)
    image_factory(d / ".tmp-abc.jpg")  # a partial write from an interrupted run
    cut = image_factory(d / "truncated.jpg", size=(256, 256))
    cut.write_bytes(cut.read_bytes()[:400])
    (d / "sub").mkdir()
    image_factory(d / "sub" / "nested.jpg")
    assert count_valid_class_images(d) == 2
    assert count_valid_class_images(tmp_path / "missing") == 0


def test_missing_per_concept_counts_shared_folders_once(tmp_path, image_factory):
    shared, other = tmp_path / "dogs", tmp_path / "cats"
    image_factory(shared / "0.jpg")
    concepts = [concept(shared), concept(other, "a cat"), concept(shared)]
    got = missing_per_concept(concepts, 4)
    assert [(c.class_data_dir, n) for c, n in got] == [(str(shared), 3), (str(other), 4)]


# --------------------------------------------------------------------------- generation


def test_generates_exactly_the_missing_images_then_none(tmp_path, image_factory, loader):
    d = tmp_path / "class"
    image_factory(d / "mine.png")
    (d / "notes.txt").write_text("x")
    made = ensure_class_images([concept(d)], fast(num_class_images=4), loader)
    assert made == {str(d): 3}
    generated = [n for n in names(d) if NAME.match(n)]
    assert sorted(int(NAME.match(n).group(1)) for n in generated) == [0, 1, 2]
    assert count_valid_class_images(d) == 4
    assert not [n for n in names(d) if n.startswith(".tmp-")]
    assert loader.calls == 1
    # A re-run adds none and never loads the model.
    assert ensure_class_images([concept(d)], fast(num_class_images=4), loader) == {str(d): 0}
    assert loader.calls == 1
    assert count_valid_class_images(d) == 4


def test_junk_does_not_count_so_it_is_replaced(tmp_path, image_factory, loader):
    d = tmp_path / "class"
    d.mkdir()
    (d / "a.txt").write_text("x")
    (d / "Thumbs.db").write_bytes(b"\x00" * 32)
    image_factory(d / ".tmp-x.jpg")
    cut = image_factory(d / "truncated.jpg", size=(256, 256))
    cut.write_bytes(cut.read_bytes()[:400])
    made = ensure_class_images([concept(d)], fast(num_class_images=2), loader)
    assert made == {str(d): 2}
    assert count_valid_class_images(d) == 2


def test_same_seed_same_images_and_batching_does_not_matter(tmp_path, loader):
    runs = {}
    for name, batch in (("a", 2), ("b", 2), ("c", 3)):
        d = tmp_path / name
        ensure_class_images([concept(d)], fast(num_class_images=3, sample_batch_size=batch), loader)
        runs[name] = names(d)
    assert len(runs["a"]) == 3 and all(NAME.match(n) for n in runs["a"])
    assert runs["a"] == runs["b"]
    assert runs["a"] == runs["c"]
    d = tmp_path / "other-seed"
    ensure_class_images([concept(d)], fast(num_class_images=1, seed=8), loader)
    assert set(names(d)).isdisjoint(runs["a"])


def test_resumed_run_makes_what_the_uninterrupted_run_made(tmp_path, loader):
    full = tmp_path / "full"
    ensure_class_images([concept(full)], fast(num_class_images=4), loader)
    part = tmp_path / "part"
    ensure_class_images([concept(part)], fast(num_class_images=2), loader)  # "interrupted" after 2
    (part / ".tmp-crashed.jpg").write_bytes(b"\xff\xd8partial")  # what a kill mid-write leaves
    ensure_class_images([concept(part)], fast(num_class_images=4), loader)
    assert [n for n in names(part) if NAME.match(n)] == names(full)


def test_a_deleted_image_is_regenerated_under_its_own_index(tmp_path, loader):
    d = tmp_path / "class"
    ensure_class_images([concept(d)], fast(num_class_images=3), loader)
    before = names(d)
    removed = next(n for n in before if n.startswith("1-"))
    (d / removed).unlink()
    assert ensure_class_images([concept(d)], fast(num_class_images=3), loader) == {str(d): 1}
    assert names(d) == before


def test_batch_size_not_dividing_the_count(tmp_path, tiny_pipe):
    sizes = []

    class Recording:
        def __getattr__(self, name):
            return getattr(tiny_pipe, name)

        def __call__(self, prompt, **kw):
            sizes.append(len(prompt))
            return tiny_pipe(prompt, **kw)

    d = tmp_path / "class"
    made = ensure_class_images([concept(d)], fast(num_class_images=5, sample_batch_size=3), Recording)
    assert made == {str(d): 5}
    assert sizes == [3, 2]
    assert count_valid_class_images(d) == 5


def test_shared_class_folder_is_filled_once(tmp_path, loader):
    d = tmp_path / "people"
    concepts = [concept(d, "a photo of a person"), concept(d, "a photo of a person")]
    made = ensure_class_images(concepts, fast(num_class_images=3), loader)
    assert made == {str(d): 3}
    assert count_valid_class_images(d) == 3


def test_negative_prompt_and_size_reach_the_pipeline(tmp_path, tiny_pipe):
    seen = {}

    def fake_pipe(prompt, **kw):
        seen.update(kw, prompt=prompt)
        return tiny_pipe(prompt, **kw)

    fake_pipe.unet, fake_pipe.vae_scale_factor = tiny_pipe.unet, tiny_pipe.vae_scale_factor
    d = tmp_path / "class"
    ensure_class_images([concept(d)], fast(num_class_images=1, negative_prompt="blurry", height=40,
                                           width=48, class_guidance_scale=2.0), lambda: fake_pipe)
    assert seen["negative_prompt"] == ["blurry"] and seen["prompt"] == ["a photo of a dog"]
    assert seen["guidance_scale"] == 2.0
    from PIL import Image

    with Image.open(next(d.iterdir())) as img:
        assert img.size == (48, 40)


# --------------------------------------------------------------------------- user errors


def test_empty_class_folder_is_a_clear_error_before_loading(tmp_path, loader, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ClassGenError, match="'class_data_dir' is empty"):
        ensure_class_images([Concept(instance_data_dir="", class_prompt="a dog", class_data_dir="")],
                            fast(), loader)
    assert loader.calls == 0
    assert list(tmp_path.iterdir()) == []  # nothing written to the current folder


def test_empty_class_prompt_generates_with_one_warning(tmp_path, loader, caplog):
    """The original notebook's Method 1: no class prompt, yet missing class images are made
    (from the empty prompt), with one warning saying what that means and how to give one."""
    folder = tmp_path / "c"
    with caplog.at_level("WARNING", logger="dbtools.train.classgen"):
        made = ensure_class_images([concept(folder, prompt="")], fast(), loader)
    assert made == {str(folder): 3} and len(names(folder)) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "class prompt is empty" in warnings[0] and "--class_prompt" in warnings[0]


def test_missing_folder_is_created_only_when_its_parent_exists(tmp_path, loader):
    with pytest.raises(ClassGenError, match="parent folder does not exist"):
        ensure_class_images([concept(tmp_path / "no" / "such" / "class")], fast(), loader)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ClassGenError, match="is a file, not a folder"):
        ensure_class_images([concept(tmp_path / "a-file")], fast(), loader)
    assert loader.calls == 0
    made = ensure_class_images([concept(tmp_path / "new")], fast(num_class_images=1), loader)
    assert made == {str(tmp_path / "new"): 1}


def test_bad_settings_are_reported_together(tmp_path, loader):
    with pytest.raises(ClassGenError) as err:
        ensure_class_images([concept(tmp_path / "c")], fast(sample_batch_size=0, height=30), loader)
    assert "--sample_batch_size" in str(err.value) and "multiple of 8" in str(err.value)
    assert loader.calls == 0


# --------------------------------------------------------------------------- command line


def test_cli_with_concepts_list(tmp_path, tiny_sd, capsys):
    concepts = [concept(tmp_path / "dogs"), concept(tmp_path / "cats", "a photo of a cat")]
    write_concepts(tmp_path / "concepts_list.json", concepts)
    argv = ["--pretrained_model_name_or_path", str(tiny_sd), "--concepts_list",
            str(tmp_path / "concepts_list.json"), "--num_class_images", "2", "--sample_batch_size", "2",
            "--seed", "1337", "--num_inference_steps", "1", "--resolution", "32",
            "--revision", "fp16", "--mixed_precision", "fp16"]
    assert main(argv) == 0
    assert count_valid_class_images(tmp_path / "dogs") == 2
    assert count_valid_class_images(tmp_path / "cats") == 2
    assert "2 class image(s) generated" in capsys.readouterr().out


def test_cli_user_errors_exit_2_with_a_message(tmp_path, tiny_sd, capsys):
    from dbtools import cli

    assert cli.main(["classgen", "--pretrained_model_name_or_path", str(tiny_sd), "--class_data_dir", "",
                     "--class_prompt", "a dog"]) == 2
    assert "'class_data_dir' is empty" in capsys.readouterr().err
    assert cli.main(["classgen", "--pretrained_model_name_or_path", str(tmp_path / "nope"),
                     "--class_data_dir", str(tmp_path / "c"), "--class_prompt", "a dog"]) == 2
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- precision


def test_precision_is_half_on_cuda_and_falls_back_to_fp32_elsewhere(caplog, monkeypatch):
    import logging

    import torch

    from dbtools.train.classgen import precision_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert precision_dtype(None, "cuda") == torch.float16
    assert precision_dtype("bf16", "cuda") == torch.bfloat16
    assert precision_dtype("fp32", "cuda") == torch.float32
    assert precision_dtype(None, "cpu") == torch.float32
    with caplog.at_level(logging.WARNING, logger="dbtools.train.classgen"):
        assert precision_dtype("fp16", "cpu") == torch.float32
    assert "needs a CUDA GPU" in caplog.text
    with pytest.raises(ClassGenError, match="unknown precision"):
        precision_dtype("fp8", "cuda")


@pytest.mark.gpu
def test_fp16_generation_on_cuda(tmp_path, tiny_sd):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from dbtools.train.classgen import pipeline_loader_for

    cfg = fast(num_class_images=3)
    load = pipeline_loader_for(str(tiny_sd), cfg)
    pipe = load()
    assert pipe.device.type == "cuda" and pipe.unet.dtype == torch.float16
    d = tmp_path / "class"
    assert ensure_class_images([concept(d)], cfg, lambda: pipe) == {str(d): 3}
    assert count_valid_class_images(d) == 3


def test_bf16_on_a_gpu_that_only_emulates_it_generates_in_fp16(caplog, monkeypatch):
    """A T4 answers True to `is_bf16_supported()` through emulation; only native bf16 counts."""
    import logging

    import torch

    from dbtools.train.classgen import precision_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with caplog.at_level(logging.WARNING, logger="dbtools.train.classgen"):
        assert precision_dtype("bf16", "cuda") == torch.float16
    assert "emulation" in caplog.text
    assert precision_dtype("fp16", "cuda") == torch.float16


# --------------------------------------------------------------------------- several processes


def test_processes_share_the_missing_indices_and_together_make_what_one_would(tmp_path, image_factory, loader):
    from dbtools.train.classgen import plan_class_images

    one, split = tmp_path / "one", tmp_path / "split"
    for d in (one, split):
        image_factory(d / "1-existing.png", size=(32, 32))
    ensure_class_images([concept(one)], fast(num_class_images=6), loader)
    cfg = fast(num_class_images=6)
    plan = plan_class_images([concept(split)], cfg)  # every process plans before any writes
    assert [indices for _, indices in plan] == [[0, 2, 3, 4, 5]]
    made = [ensure_class_images([concept(split)], cfg, loader, plan=plan, rank=r, world=2)[str(split)]
            for r in (1, 0)]
    assert made == [2, 3]
    assert names(split) == names(one) and len(names(split)) == 6


def test_class_images_differ_from_each_other_and_the_same_plan_makes_them_again(tmp_path, loader):
    """Each index has its own seed: four images, four different pictures; the same plan
    (seed, prompt, count) in a new folder makes the same four files, pixel for pixel."""
    import itertools

    import numpy as np
    from PIL import Image

    made = {}
    for name in ("first", "again"):
        d = tmp_path / name
        ensure_class_images([concept(d)], fast(num_class_images=4, sample_batch_size=2), loader)
        made[name] = {n: np.asarray(Image.open(d / n), dtype=np.int16) for n in names(d)}
    first = made["first"]
    assert len(first) == 4 and first.keys() == made["again"].keys()
    assert all(np.array_equal(first[n], made["again"][n]) for n in first)
    assert len({n.split("-")[1] for n in first}) == 4  # the pixel digests in the names differ
    gaps = [float(np.abs(a - b).mean()) for a, b in itertools.combinations(first.values(), 2)]
    assert min(gaps) > 2.0, gaps  # mean difference in 8-bit levels between any two images


def test_class_images_use_the_family_guidance_not_the_training_guidance_embedding():
    """Flux's training `--guidance_scale 1.0` feeds the guidance embedding while training; its class
    images are made at the Flux pipeline's own guidance (3.5), SD's at 7.5, unless one is asked for."""
    from dbtools.train.classgen import _guidance
    from dbtools.train.config import TrainConfig, view

    FluxPipeline = type("FluxPipeline", (), {})
    StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
    cfg = view(ClassGenConfig, TrainConfig(guidance_scale=1.0))
    assert _guidance(FluxPipeline(), cfg) == 3.5
    assert _guidance(StableDiffusionPipeline(), cfg) == 7.5
    assert _guidance(FluxPipeline(), ClassGenConfig(class_guidance_scale=2.0)) == 2.0
