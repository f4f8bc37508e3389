"""The one base class for problems a user can fix (bad paths, flags, files), and the one
place such a problem becomes a message and an exit code.

Every command's entry (`python -m dbtools ...`, `train_dreambooth.py`) is wrapped in
`reports_user_errors`: a `UserError` is printed as one `error: ...` message on stderr and
the exit code is 2; anything else is a bug in dbtools and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class UserError(ValueError):
    """A problem the user can fix; the message names the file or flag and the fix.

    In IPython (the notebook) it shows as that one message, with no traceback: IPython
    prints what `_render_traceback_` returns in place of the traceback. The cell still
    fails, so Run All stops there.
    """

    def _render_traceback_(self) -> list[str]:
        return [error_message(self, color=True)]


class FolderNotFound(UserError, FileNotFoundError):
    """A folder the user named is missing (or is a file); still a `FileNotFoundError`."""


_RED_ERROR = "\x1b[1;31merror:\x1b[0m"


def error_message(exc: UserError, color: bool = False) -> str:
    """`exc` as the user sees it, on the command line and in the notebook: `error: <message>`
    (`color`: "error:" in bold red, as the notebook shows it)."""
    return f"{_RED_ERROR if color else 'error:'} {exc}"


def reports_user_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command's `main`: a `UserError` it raises is printed on stderr as one
    `error: ...` message (no traceback) and `main` returns 2; other exceptions rise."""

    @functools.wraps(main)
    def entry(*args, **kwargs) -> int:
        try:
            return int(main(*args, **kwargs) or 0)
        except UserError as exc:
            print(error_message(exc), file=sys.stderr)
            return 2

    return entry
