"""Running dbtools commands from a notebook: the training command line (`accelerate launch
train_dreambooth.py` with flags), its pre-check, and the subprocess runner that streams a
command's output into the cell and shows its `error:` line without a launcher's traceback.

A leaf of the `ui` package: the notebook's cells and the training panel use it."""

from __future__ import annotations

import codecs
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from dbtools.core.error_lines import ErrorLines
from dbtools.core.errors import UserError
from dbtools.core.redact import is_secret_flag, mask_secret_text
from dbtools.train.config import build_parser

logger = logging.getLogger(__name__)


# =========================================================================== training launch


def flag_args(**flags: Any) -> list[str]:
    """Command-line flags from keyword arguments named after the flags.

    `True` -> bare `--flag`; `False`/`None` -> omitted; a list or tuple -> `--flag a b`;
    anything else -> `--flag=value` (the `=` keeps values that start with `-` intact).
    """
    args: list[str] = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        flag = "--" + name
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            if value:
                args += [flag, *(str(v) for v in value)]
        else:
            args.append(f"{flag}={os.fspath(value) if isinstance(value, os.PathLike) else value}")
    return args


PROJECT_DIR = Path(__file__).resolve().parents[2]
"""The project folder this dbtools was loaded from (it holds `train_dreambooth.py`)."""


def train_script() -> list[str]:
    """How `accelerate launch` runs training: the project's `train_dreambooth.py` wherever the
    notebook runs from (its short name when it is in the working folder), else the same
    trainer as a module (`-m dbtools train`, for an installed dbtools without the project)."""
    script = PROJECT_DIR / "train_dreambooth.py"
    if not script.is_file():
        return ["-m", "dbtools", "train"]
    try:
        return [os.fspath(script.relative_to(Path.cwd().resolve()))]
    except ValueError:
        return [os.fspath(script)]


def build_train_command(
    *,
    script: str | os.PathLike | None = None,
    launch_args: Iterable[str] = (),
    **flags: Any,
) -> list[str]:
    """The argv for `accelerate launch <script> <flags>`, the same flags the CLI takes.

    Keyword arguments are named after `train_dreambooth.py`'s flags
    (`pretrained_model_name_or_path=...`, `with_prior_preservation=True`, ...); see
    `flag_args` for how values become flags. `launch_args` go to `accelerate launch`
    itself (e.g. `["--num_processes=2"]`). Accelerate runs through the current Python
    (`python -m accelerate.commands.launch`), so the kernel's environment is used even
    when its `bin/` is not on PATH; `--quiet` keeps its own traceback out when training
    stops with a message. `script` defaults to `train_script()`. A `hub_token` is refused:
    log in with `hf_login()`.
    """
    secret = [name for name, value in flags.items() if is_secret_flag(name) and value]
    if secret:
        raise UserError(f"Do not pass {secret[0]} as a flag (it would be visible in the command and "
                         "saved with the run). Log in with hf_login() or set $HF_TOKEN instead.")
    flags = {name: value for name, value in flags.items() if not is_secret_flag(name)}
    bad = [name for name in flags if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)]
    if bad:
        raise UserError(f"not valid flag names: {bad}")
    args = flag_args(**flags)
    target = train_script() if script is None else [os.fspath(script)]
    if script is None or Path(script).name == "train_dreambooth.py":
        check_train_flags(args)
    launch_args = list(launch_args) or _launch_defaults()
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", *launch_args]
    return launcher + target + args


def _launch_defaults() -> list[str]:
    """Without an accelerate config file, accelerate prints every default it picks; passing
    the single-process defaults keeps that noise out. A config file (`accelerate config`,
    e.g. for several GPUs) is left to decide."""
    from accelerate.commands.config import default_config_file

    if os.path.isfile(default_config_file):
        return []
    return ["--num_processes=1", "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]


def check_train_flags(args: list[str]) -> None:
    """Parse `args` with the training parser; `UserError` naming a wrong flag or value.

    Catches typos in notebook fields before accelerate starts or a model loads.
    """
    import argparse
    import difflib


    parser = build_parser()
    parser.exit_on_error = False
    try:
        _, unknown = parser.parse_known_args(args)
    except argparse.ArgumentError as exc:
        raise UserError(mask_secret_text(f"training flag problem: {exc}")) from None
    known = [s[2:] for a in parser._actions for s in a.option_strings if s.startswith("--")]
    problems = []
    for arg in unknown:
        name = arg.split("=", 1)[0].lstrip("-")
        if arg.startswith("--"):
            close = difflib.get_close_matches(name, known, n=1)
            problems.append(f"--{name} is not a training flag" + (f" (did you mean --{close[0]}?)" if close else ""))
    if problems:
        raise UserError("; ".join(problems))


class CommandError(RuntimeError):
    """A command run by `run_command(check=True)` failed; the message has its last output lines."""

    def __init__(self, argv: list[str], returncode: int, tail: list[str]):
        self.argv, self.returncode, self.tail = argv, returncode, tail
        last = "".join(tail).rstrip() or "(no output)"
        super().__init__(f"command failed with exit code {returncode}: {' '.join(argv[:4])} ...\n"
                         f"last output:\n{last}")


def run_command(
    argv: list[str],
    cwd: str | os.PathLike | None = None,
    *,
    check: bool = False,
    env: dict[str, str] | None = None,
    stream: TextIO | None = None,
    user_errors: list[str] | None = None,
) -> int:
    """Run `argv`, streaming its stdout and stderr (merged, in order) as they are written.

    Output goes to `stream` (default: the current `sys.stdout`, which in a notebook is
    the cell). Carriage returns are passed through, so progress bars update in place.
    Returns the exit code; with `check=True` a non-zero exit raises `CommandError`
    quoting the last lines. Interrupting (the notebook's stop button) stops the child
    and everything it started (e.g. the processes `accelerate launch` spawns).

    With a `user_errors` list, the message of a line `error: ...` (how dbtools' commands
    report a problem the user can fix) is put there instead of being shown, and the output
    after it (a launcher's traceback) is held back; `DBTOOLS_VERBOSE=1` shows them too.
    """
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    # A session of its own: the whole process tree can be stopped together.
    proc = subprocess.Popen([os.fspath(a) for a in argv], cwd=cwd, env=child_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=os.name == "posix")
    tail: list[str] = []
    out = stream or sys.stdout
    if user_errors is not None:
        out = ErrorLines(out, user_errors, show_all=os.environ.get("DBTOOLS_VERBOSE") == "1")
    try:
        _pump(proc.stdout, out, tail)
        if isinstance(out, ErrorLines):
            out.close()
        code = proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        proc.stdout.close()
    if check and code != 0:
        raise CommandError(list(map(os.fspath, argv)), code, tail)
    return code


def _pump(pipe, out: TextIO, tail: list[str], keep_chars: int = 4000) -> None:
    """Copy decoded output from `pipe` to `out` as it arrives; put the last lines in `tail`."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending, recent = "", ""
    while True:
        chunk = pipe.read1(65536)
        text = pending + decoder.decode(chunk, final=not chunk)
        # hold a trailing "\r" back: it may be the first half of "\r\n"
        text, pending = (text[:-1], "\r") if chunk and text.endswith("\r") else (text, "")
        text = text.replace("\r\n", "\n")
        if text:
            out.write(text)
            out.flush()
            recent = (recent + text)[-keep_chars:]
        if not chunk:
            break
    lines = [line.rsplit("\r", 1)[-1] for line in recent.rstrip("\n").split("\n")]
    tail[:] = [line + "\n" for line in lines[-20:]]


# A line where a launcher's or Python's report starts after our message.
def _stop(proc: subprocess.Popen) -> None:
    """Stop `proc` and its process group: SIGTERM, then SIGKILL after 10 seconds."""
    _signal_tree(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _signal_tree(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
        proc.wait()


def _signal_tree(proc: subprocess.Popen, sig: int) -> None:
    try:
        if os.name == "posix":
            os.killpg(proc.pid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass
