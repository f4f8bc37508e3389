"""The one base class for problems a user can fix (bad paths, flags, files).

Every CLI catches `UserError` once, prints its message to stderr and exits with code 2;
anything else is a bug in dbtools and keeps its traceback.
"""

from __future__ import annotations

import sys


class UserError(ValueError):
    """A problem the user can fix; the message names the file or flag and the fix.

    In IPython (the notebook) it shows as that one message, with no traceback: IPython
    prints what `_render_traceback_` returns in place of the traceback. The cell still
    fails, so Run All stops there.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[1;31merror:\x1b[0m {self}"]


def report(exc: UserError) -> int:
    """Print `exc` as one message on stderr and return the exit code for user errors (2)."""
    print(f"error: {exc}", file=sys.stderr)
    return 2
