"""The one base class for problems a user can fix (bad paths, flags, files).

Every CLI catches `UserError` once, prints its message to stderr and exits with code 2;
anything else is a bug in dbtools and keeps its traceback.
"""

from __future__ import annotations

import sys


class UserError(ValueError):
    """A problem the user can fix; the message names the file or flag and the fix."""


def report(exc: UserError) -> int:
    """Print `exc` as one message on stderr and return the exit code for user errors (2)."""
    print(f"error: {exc}", file=sys.stderr)
    return 2
