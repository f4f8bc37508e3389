"""The one base class for problems a user can fix (bad paths, flags, files).

Every CLI catches `UserError` once, prints its message to stderr and exits with code 2;
anything else is a bug in dbtools and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix; the message names the file or flag and the fix."""
