"""Captioning speed: one image at a time vs the batched `run_caption` pipeline.

The model has BLIP's real base architecture (`BlipConfig()` defaults: ViT-B/16 at
384 px, a 12-layer BERT-base text decoder, a 30,524-token vocabulary) with random
weights, so nothing is downloaded. Every caption is exactly `--tokens` tokens long
(min = max), so both methods do the same amount of work whatever the weights say.
`--num_beams` defaults to 1 (greedy) to keep CPU runs short; EveryDream's 16 beams
multiply the decoder's share of the work.

Both methods run in the same process on the same generated JPEGs (768x512):

- naive: for each file, `load_rgb` -> processor -> `model.generate` -> decode -> write
  its sidecar caption, as a one-image-at-a-time script does;
- batched: `run_caption` (DataLoader workers decode and preprocess the next batch
  while the model generates), writing the same sidecar files.

With `--model DIR` (any captioner family: BLIP, BLIP-2, Florence-2, a WD14-style tagger,
an instruction VLM, e.g. the tiny ones `python -m dbtools tiny --out DIR` writes, or a
Hub id) that model is loaded with `load_captioner`, and "naive" is `run_caption` with
one image per batch and no worker processes, so both methods write the same outputs
through the same code. On CUDA the peak memory of the run is printed too.

With `--repeats R` each method runs R times, alternating which goes first, and the
figures are totals over all runs; on a machine shared with other jobs this keeps a
change of background load from favouring one method.

    python bench/caption.py [--model DIR] [--device cpu|cuda] [--n 16] [--batch_size 8]
                            [--num_workers N] [--repeats R]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dbtools.caption.autocaption import (  # noqa: E402
    CaptionConfig,
    Captioner,
    default_num_workers,
    generation_kwargs,
    load_captioner,
    run_caption,
)
from dbtools.core.atomic import atomic_write_text  # noqa: E402
from dbtools.dataset.captions import clean_caption  # noqa: E402
from dbtools.dataset.images import list_images, load_rgb  # noqa: E402
from dbtools.families.models import pick_device  # noqa: E402
from dbtools.tiny import write_bert_vocab  # noqa: E402


def base_blip(folder: Path, device, dtype) -> Captioner:
    """A blip-base-sized captioner with random weights and a full-size BERT vocabulary."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    vocab = write_bert_vocab(folder)
    size = BlipConfig().text_config.vocab_size
    vocab = vocab[:-1] + [f"##x{i}" for i in range(size - len(vocab))] + ["[DEC]"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    ids = {tok: i for i, tok in enumerate(vocab)}
    tokenizer = BertTokenizer.from_pretrained(folder, bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(), tokenizer=tokenizer)
    config = BlipConfig(text_config=dict(bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"],
                                         eos_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"]))
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).to(device, dtype).eval()
    return Captioner(model, processor, "blip", device, dtype)


def make_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    x = np.linspace(0, 255, 768)[None, :]
    y = np.linspace(0, 255, 512)[:, None]
    for i in range(n):
        base = np.stack([x + 0 * y, y + 0 * x, (x + y + 40 * i) % 256], axis=2)
        noisy = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"img_{i:03}.jpg", quality=90)


def naive(captioner: Captioner, paths: list[Path], cfg: CaptionConfig, out: Path) -> dict[str, str]:
    """One image at a time: load, preprocess, generate, decode, write."""
    gen = generation_kwargs(cfg)
    captions = {}
    for path in paths:
        inputs = captioner.processor(images=load_rgb(path), text=cfg.prompt, return_tensors="pt")
        inputs = {k: v.to(captioner.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(captioner.dtype)
        with torch.inference_mode():
            ids = captioner.model.generate(**inputs, **gen)
        skip = inputs["input_ids"].shape[1] - 1  # the prompt, as in Captioner.generate
        text = clean_caption(captioner.processor.decode(ids[0, skip:], skip_special_tokens=True))
        atomic_write_text(out / f"{path.name}.txt", text)
        captions[path.name] = text
    return captions


def one_batch_at_a_time(captioner, paths: list[Path], cfg: CaptionConfig, out: Path) -> dict[str, str]:
    """`run_caption` with batches of one image and no decoding workers."""
    single = CaptionConfig(**{**vars(cfg), "img_dir": paths[0].parent, "out_dir": out, "batch_size": 1,
                              "num_workers": 0, "overwrite": True})
    summary = run_caption(single, captioner, progress=False)
    assert summary.ok and len(summary.written) == len(paths), summary.failed
    return {r.source.name: r.caption for r in summary.written}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="captioner folder or Hub id of any family (default: BLIP base architecture, "
                        "random weights)")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: best available)")
    p.add_argument("--n", type=int, default=16, help="number of images (16)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: the tool's)")
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--tokens", type=int, default=20, help="caption length, fixed (20)")
    p.add_argument("--repeats", type=int, default=1, help="runs per method, alternating order (1)")
    args = p.parse_args(argv)

    device = torch.device(pick_device(args.device))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "imgs", args.n)
        if args.model:
            captioner = load_captioner(args.model, device=device)
            one_by_one_fn, name = one_batch_at_a_time, f"{captioner.kind} from {args.model}"
        else:
            captioner = base_blip(tmp / "model", device, dtype)
            one_by_one_fn, name = naive, "BLIP base architecture"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        cfg = CaptionConfig(img_dir=tmp / "imgs", out_dir=tmp / "batched", format="sidecar",
                            min_length=args.tokens, max_length=args.tokens, num_beams=args.num_beams,
                            batch_size=args.batch_size, num_workers=args.num_workers,
                            prompt=None if args.model else "a picture of")
        paths = list_images(cfg.img_dir)
        (tmp / "warm").mkdir()
        warm = _copy_one(paths[0], tmp / "warm_imgs")
        one_by_one_fn(captioner, [warm], cfg, tmp / "warm")  # warm-up (allocator, kernels), not timed
        (tmp / "naive").mkdir()
        t_naive = t_batched = 0.0
        for r in range(args.repeats):
            for method in ("naive", "batched") if r % 2 == 0 else ("batched", "naive"):
                t0 = time.perf_counter()
                if method == "naive":
                    one_by_one = one_by_one_fn(captioner, paths, cfg, tmp / "naive")
                    t_naive += _sync(device, t0)
                else:
                    summary = run_caption(cfg, captioner, progress=False)
                    t_batched += _sync(device, t0)
                    assert summary.ok and len(summary.written) == args.n, summary.failed
                    cfg.overwrite = True  # the next run captions everything again

    same = sum(one_by_one[r.source.name] == r.caption for r in summary.written)
    n = args.n * args.repeats
    n_params = _n_params(captioner)
    print(f"device {device} ({dtype}), {name} ({n_params:.1f}M params, random weights), "
          f"{args.n} images 768x512{'' if args.model else ' -> 384 px'}, {args.tokens} tokens, "
          f"{args.num_beams} beam(s), "
          f"torch threads {torch.get_num_threads()}, {args.repeats} run(s) per method")
    workers = default_num_workers() if args.num_workers is None else args.num_workers
    print(f"naive   (1 image at a time):                  {n / t_naive:8.3f} images/s  ({t_naive:.1f} s)")
    print(f"batched (run_caption, batch {args.batch_size}, {workers} worker(s)): "
          f"{n / t_batched:8.3f} images/s  ({t_batched:.1f} s)")
    print(f"speed-up {t_naive / t_batched:.2f}x; identical captions {same}/{args.n}")
    if device.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return 0


def _n_params(captioner) -> float:
    """Millions of parameters (the tagger's ONNX weights are not counted: 0)."""
    parts = [captioner]
    if hasattr(captioner, "captioner"):
        parts = [captioner.captioner]
    return sum(p.numel() for c in parts if hasattr(c, "model") for p in c.model.parameters()) / 1e6


def _copy_one(path: Path, folder: Path) -> Path:
    folder.mkdir()
    (folder / path.name).write_bytes(path.read_bytes())
    return folder / path.name


def _sync(device, t0: float) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


if __name__ == "__main__":
    raise SystemExit(main())
