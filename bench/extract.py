"""Benchmark the Omnitool against a bare Python loop over the same files.

    python bench/extract.py [--n 100000] [--repeat 3] [--dir /tmp] [--template T]

Makes two folders of N empty image files (`a red car_<i>.png`, `.JPG`, `.jpeg`, `.webp`,
plus a few non-images), then, in the same run and on the same disk:

- first run: `run_extract` writing N caption files, vs a bare loop that writes the same
  N files with the same content (`with open(path, "w") as f: f.write(text)`, the paths
  and texts computed before the clock starts);
- re-run: `run_extract` again with nothing to change, vs a bare loop that reads the
  same N caption files (`with open(path) as f: f.read()`).

The same loops in binary mode (`"wb"`/`"rb"`, a little faster than text mode) are
measured and printed too. `--atomic_from REV` also times `run_extract` with
`dbtools/core/atomic.py` as it was at git revision REV, in the same run, to compare two
ways of writing files atomically. Each measurement is repeated (alternating which side goes
first) and the best time counts, which keeps other processes on the machine from
deciding the result. Targets: first run within 1.6x, re-run within 2x of the bare
(text-mode) loops.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dbtools import extract  # noqa: E402
from dbtools.dataset.captions import caption_file_name, caption_from_filename  # noqa: E402
from dbtools.dataset.concepts import Concept  # noqa: E402
from dbtools.dataset.extract import ExtractConfig, plan_caption, run_extract  # noqa: E402

EXTENSIONS = (".png", ".JPG", ".jpeg", ".webp")


def make_folder(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True)
    names = [f"a red car_{i}{EXTENSIONS[i % len(EXTENSIONS)]}" for i in range(n)]
    for name in names + ["Thumbs.db", ".DS_Store", "notes.caption"]:
        open(folder / name, "wb").close()
    return names


def clear_captions(folder: Path) -> None:
    for entry in os.scandir(folder):
        if entry.name.endswith(".txt"):
            os.unlink(entry.path)
    shutil.rmtree(folder / ".dbtools", ignore_errors=True)


def bare_write(pairs: list[tuple[str, str]], binary: bool = False) -> float:
    if binary:
        encoded = [(path, text.encode("utf-8")) for path, text in pairs]
        start = time.perf_counter()
        for path, data in encoded:
            with open(path, "wb") as fh:
                fh.write(data)
        return time.perf_counter() - start
    start = time.perf_counter()
    for path, text in pairs:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    return time.perf_counter() - start


def bare_read(paths: list[str], binary: bool = False) -> float:
    start = time.perf_counter()
    if binary:
        for path in paths:
            with open(path, "rb") as fh:
                fh.read()
    else:
        for path in paths:
            with open(path, encoding="utf-8") as fh:
                fh.read()
    return time.perf_counter() - start


def timed_extract(concept: Concept, cfg: ExtractConfig, expect: str, n: int) -> float:
    start = time.perf_counter()
    summary = run_extract([concept], cfg)
    elapsed = time.perf_counter() - start
    if summary.counts[expect] != n:
        raise SystemExit(f"expected {n} {expect}, got {dict(summary.counts)}")
    return elapsed


def atomic_at(rev: str):
    """`dbtools/core/atomic.py` as it was at git revision `rev`, as a module object."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:dbtools/core/atomic.py"],
                            check=True, capture_output=True, text=True).stdout
    module = type(sys)(f"atomic_{rev}")
    exec(compile(source, f"{rev}:dbtools/core/atomic.py", "exec"), module.__dict__)
    return module


@contextlib.contextmanager
def extract_using(module):
    """Run `run_extract` with `module`'s `atomic_create`/`atomic_put` for a while."""
    saved = extract.atomic_create, extract.atomic_put
    extract.atomic_create, extract.atomic_put = module.atomic_create, module.atomic_put
    try:
        yield
    finally:
        extract.atomic_create, extract.atomic_put = saved


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the temporary folders go")
    parser.add_argument("--template", default=None, help="default: method 1, '{caption}'")
    parser.add_argument("--instance_prompt", default="")
    parser.add_argument("--class_prompt", default="")
    parser.add_argument("--no_progress", dest="progress", action="store_false")
    parser.add_argument("--atomic_from", default=None, metavar="REV",
                        help="also time run_extract with dbtools/core/atomic.py from this git revision")
    args = parser.parse_args()
    other = atomic_at(args.atomic_from) if args.atomic_from else None

    root = Path(tempfile.mkdtemp(prefix="bench-extract-", dir=args.dir))
    try:
        ours, base = root / "ours", root / "bare"
        names = make_folder(ours, args.n)
        make_folder(base, args.n)
        concept = Concept(str(ours), args.instance_prompt, args.class_prompt)
        cfg = ExtractConfig(template=args.template, progress=args.progress)
        pairs = [(os.path.join(base, caption_file_name(name)),
                  plan_caption(name, concept, args.template)) for name in names]
        ours_txt = [os.path.join(ours, caption_file_name(name)) for name in names]
        assert caption_from_filename(names[0]) == "a red car"

        times: dict[str, list[float]] = {k: [] for k in (
            "bare write", "bare write (wb)", "extract first run",
            "bare read", "bare read (rb)", "extract re-run")}
        if other:
            times[f"first run @{args.atomic_from}"] = []
            times[f"re-run @{args.atomic_from}"] = []

        def first_runs() -> list[tuple[str, Callable[[], float]]]:
            def clear_and(fn):
                def run():
                    clear_captions(base)
                    return fn()
                return run
            return [("bare write", clear_and(lambda: bare_write(pairs))),
                    ("bare write (wb)", clear_and(lambda: bare_write(pairs, binary=True))),
                    ("extract first run", lambda: timed_extract(concept, cfg, "written", args.n))]

        re_runs = [("bare read", lambda: bare_read(ours_txt)),
                   ("bare read (rb)", lambda: bare_read(ours_txt, binary=True)),
                   ("extract re-run", lambda: timed_extract(concept, cfg, "unchanged", args.n))]
        def old_atomic(fn, clear=False):
            def run():
                if clear:
                    clear_captions(ours)
                with extract_using(other):
                    return fn()
            return run

        for r in range(args.repeat):
            clear_captions(ours)
            step = 1 if r % 2 == 0 else -1  # alternate which side goes first
            for label, fn in first_runs()[::step]:
                times[label].append(fn())
            for label, fn in re_runs[::step]:
                times[label].append(fn())
            if other:  # the same two runs again with the other revision's atomic.py
                times[f"first run @{args.atomic_from}"].append(old_atomic(
                    lambda: timed_extract(concept, cfg, "written", args.n), clear=True)())
                times[f"re-run @{args.atomic_from}"].append(old_atomic(
                    lambda: timed_extract(concept, cfg, "unchanged", args.n))())
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{args.n:,} images in {root.parent}, {args.repeat} repeats (best of each), "
          f"template={cfg.template or 'default'}")
    best = {label: min(values) for label, values in times.items()}
    for label, values in times.items():
        print(f"  {label:<22} best {best[label]:7.2f} s   all: " + " ".join(f"{v:.2f}" for v in values))
    first = best["extract first run"] / best["bare write"]
    rerun = best["extract re-run"] / best["bare read"]
    print(f"  first run / bare write = {first:.2f}x (target <= 1.6x); "
          f"vs binary-mode loop {best['extract first run'] / best['bare write (wb)']:.2f}x")
    print(f"  re-run    / bare read  = {rerun:.2f}x (target <= 2x); "
          f"vs binary-mode loop {best['extract re-run'] / best['bare read (rb)']:.2f}x")
    if other:
        print(f"  @{args.atomic_from}: first run / bare write = "
              f"{best[f'first run @{args.atomic_from}'] / best['bare write']:.2f}x, re-run / bare read = "
              f"{best[f're-run @{args.atomic_from}'] / best['bare read']:.2f}x")
    return 0 if first <= 1.6 and rerun <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
