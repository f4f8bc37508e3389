"""Benchmark the concepts check that extract runs before writing anything.

    python bench/concepts.py [--same 10000] [--distinct 2000] [--dir /tmp]

Two cases, each timed once (wall clock, `time.perf_counter`):

- `--same` concepts that all name one folder (holding one image);
- `--distinct` concepts, each with its own folder (one image each).

For each case it prints the seconds `extract_problems` takes and the size of the error
message extract would print (bytes of UTF-8). Targets: each under 10 s, message under
200 KB. Runs on whatever machine it is started on; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dbtools.dataset.concepts import Concept  # noqa: E402
from dbtools.dataset.extract import ExtractConfig, extract_problems  # noqa: E402


def make_folder(path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "a red car_1.png").write_bytes(b"")
    return str(path)


def measure(name: str, concepts: list[Concept]) -> tuple[float, int]:
    start = time.perf_counter()
    problems = extract_problems(concepts, ExtractConfig(progress=False))
    seconds = time.perf_counter() - start
    size = len("\n".join(problems).encode("utf-8"))
    print(f"{name:<34} {seconds:8.2f} s   message {size / 1024:9.1f} KB   "
          f"({len(problems)} problem line(s))")
    return seconds, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--same", type=int, default=10_000, help="concepts over one folder")
    parser.add_argument("--distinct", type=int, default=2_000, help="concepts over distinct folders")
    parser.add_argument("--dir", default=None, help="where to make the folders (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        one = make_folder(root / "one")
        results = [measure(f"{args.same} concepts, one folder", [Concept(one) for _ in range(args.same)])]
        many = [Concept(make_folder(root / "many" / f"c{i}")) for i in range(args.distinct)]
        results.append(measure(f"{args.distinct} concepts, distinct folders", many))
    ok = all(s < 10 and size < 200 * 1024 for s, size in results)
    print("targets (each < 10 s, message < 200 KB):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
