"""Cost of the evaluation scores per save: seconds added to each `<step>/` weights save.

Two paths are timed. In training (`--score_saves`), `SaveScorer.score` scores the pipeline
already in memory for the save. On demand (`python -m dbtools evaluate`),
`dbtools.after.evaluate.score_step` loads the saved pipeline first. Both score the saved samples
against the instance images (likeness) and generates `--num_samples` images for each of
the eval prompts on fixed seeds to score them against their prompts (prompt fidelity).
The score models are loaded once, before the first save, as training and `evaluate` do.

Two score-model sizes, both with random weights (nothing is downloaded):

- `tiny`: the tiny DINOv2 and CLIP of `python -m dbtools tiny`;
- `real`: the architectures of `facebook/dinov2-small` and `openai/clip-vit-base-patch32`
  (224 px), to show the scoring cost of the real defaults.

The Stable Diffusion pipeline is always the tiny one (`--size` px, `--infer_steps`
steps), so "generation" shows the pipeline work the scores add per save, and "scoring"
the score models' share. On a machine with a GPU the score models move to it for
scoring and back to the CPU afterwards, as in `evaluate`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dbtools.after import evaluate as ev
from dbtools.families.models import pick_device
from dbtools.tiny import build_tiny_clip, build_tiny_dinov2, build_tiny_sd


def real_scorers(folder: Path) -> tuple[Path, Path]:
    """Random-weight DINOv2-small and CLIP ViT-B/32 folders (real architectures and sizes)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer, Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from dbtools.tiny import write_clip_tokenizer

    dino, clip = folder / "dinov2-small", folder / "clip-b32"
    Dinov2Model(Dinov2Config(hidden_size=384, num_attention_heads=6, image_size=518)).save_pretrained(dino)
    BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(dino)
    vocab = write_clip_tokenizer(clip)
    text = dict(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(patch_size=32))).save_pretrained(clip)
    CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=CLIPTokenizer.from_pretrained(clip)
                  ).save_pretrained(clip)
    return dino, clip


def make_output(root: Path, sd: Path, args: argparse.Namespace) -> Path:
    """An output folder with one saved step: tiny weights, args.json, samples, instance images."""
    rng = np.random.default_rng(0)
    inst, step = root / "inst", root / "out" / "1"
    inst.mkdir(parents=True)
    for i in range(args.instance_images):
        Image.fromarray((rng.random((512, 512, 3)) * 255).astype(np.uint8)).save(inst / f"{i}.jpg")
    import shutil

    shutil.copytree(sd, step)
    (step / "samples").mkdir()
    for i in range(args.num_samples):
        pixels = (rng.random((args.size, args.size, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(step / "samples" / f"{i}.png")
    (step / "args.json").write_text(json.dumps({
        "instance_data_dir": str(inst), "save_sample_prompt": "a photo of sks toy",
        "save_infer_steps": args.infer_steps, "save_guidance_scale": 7.5, "resolution": args.size}))
    return root / "out"


def time_training_saves(out: Path, dino: Path, clip: Path, args) -> tuple[float, float]:
    """(load seconds once, mean seconds per save) of `SaveScorer`, training's path: the saved
    pipeline is already in memory, the models are loaded once and the instance images embedded once."""
    from dbtools.after.generate import load_inference_pipeline
    from dbtools.after.preview import sample_files
    from dbtools.dataset.images import load_rgb

    plan = ev.plan_evaluation(ev.EvalConfig(str(out)))
    folder = plan.weights[0][1]
    cfg = ev.EvalConfig(str(out / "training"), likeness_model=str(dino), clip_model=str(clip),
                        num_samples=args.num_samples, batch_size=16)
    tplan = ev.training_plan(plan.instance_prompt, None, plan.references, args.infer_steps, 7.5, args.size)
    (out / "training").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    scorer = ev.SaveScorer.load(cfg, tplan)
    load = time.perf_counter() - t0
    pipe = load_inference_pipeline(folder)
    samples = [load_rgb(p) for p in sample_files(folder)]
    totals = []
    for step in range(args.saves):
        t0 = time.perf_counter()
        scorer.score(step + 1, pipe, samples, pick_device())
        totals.append(time.perf_counter() - t0)
    return load, statistics.mean(totals)


def time_saves(out: Path, dino: Path, clip: Path, args) -> tuple[float, float, float]:
    """(load seconds once, mean seconds per save, of which scoring) over `--saves` saves."""
    cfg = ev.EvalConfig(str(out), num_samples=args.num_samples, batch_size=16)
    plan = ev.plan_evaluation(cfg)
    t0 = time.perf_counter()
    likeness_model, clip_model = ev.load_likeness_model(str(dino)), ev.load_clip_model(str(clip))
    references = ev.reference_embeddings(likeness_model, plan)  # once per run, as in `evaluate`
    load = time.perf_counter() - t0
    scoring = _scoring_share(plan, cfg, likeness_model, clip_model)
    totals = []
    for _ in range(args.saves):
        t0 = time.perf_counter()
        with ev.scoring_on(pick_device(), likeness_model, clip_model):
            ev.score_step(plan.weights[0][1], plan, cfg, likeness_model, clip_model, references)
        totals.append(time.perf_counter() - t0)
    return load, statistics.mean(totals), scoring


def _scoring_share(plan, cfg, likeness_model, clip_model) -> float:
    """Seconds the score models take for one save's images (no generation)."""
    refs = ev.reference_embeddings(likeness_model, plan)
    images = [Image.new("RGB", (64, 64), (90, 120, 200))] * (cfg.num_samples * len(plan.eval_prompts))
    samples = images[:cfg.num_samples]
    prompts = [p for p in plan.eval_prompts for _ in range(cfg.num_samples)]
    ev.likeness(likeness_model, samples, refs)  # warm-up
    t0 = time.perf_counter()
    ev.likeness(likeness_model, samples, refs)
    ev.prompt_fidelity(clip_model, images, prompts)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--num_samples", type=int, default=4, help="images per prompt (4)")
    p.add_argument("--instance_images", type=int, default=10)
    p.add_argument("--size", type=int, default=64, help="tiny SD image size (64)")
    p.add_argument("--infer_steps", type=int, default=20, help="sampling steps per image (20)")
    p.add_argument("--saves", type=int, default=1, help="saves timed (1)")
    p.add_argument("--scorers", nargs="+", default=["tiny", "real"], choices=["tiny", "real"])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = make_output(tmp, build_tiny_sd(tmp / "sd"), args)
        folders = {"tiny": (build_tiny_dinov2(tmp / "dino"), build_tiny_clip(tmp / "clip"))}
        if "real" in args.scorers:
            folders["real"] = real_scorers(tmp / "real")
        print(f"device {pick_device()}, torch threads {torch.get_num_threads()}; tiny SD at {args.size} px, "
              f"{args.infer_steps} "
              f"steps; {args.num_samples} samples x {len(ev.CONTEXTS)} eval prompts, "
              f"{args.instance_images} instance images (512 px)", flush=True)
        for name in args.scorers:
            load, per_save = time_training_saves(out, *folders[name], args)
            print(f"{name:>4} score models, in training (--score_saves): load + embed instance images once "
                  f"{load:6.2f} s; per save {per_save:6.2f} s (generating the eval images, scoring, "
                  "metrics files and plot)", flush=True)
            load, per_save, scoring = time_saves(out, *folders[name], args)
            print(f"{name:>4} score models, evaluate command: load + embed instance images once {load:6.2f} s; "
                  f"per save {per_save:6.2f} s "
                  f"(score models {scoring:5.2f} s, the rest is loading the saved pipeline and generating)",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
