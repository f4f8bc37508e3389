"""The `error: ...` line of a dbtools command's output (how every command reports a problem
the user can fix), told apart from the rest of the output as it streams by, so a notebook
can show that one message instead of a launcher's traceback."""

from __future__ import annotations

import re
from typing import TextIO


class ErrorLines:
    """A text stream that passes everything on to `out` except a line starting with
    `error: ` (also after a progress bar's carriage return) and what follows it: the
    message goes into `errors`. A line is held back only while it may still turn out to be
    such a line, so progress bars stay live."""

    PREFIX = "error: "

    def __init__(self, out: TextIO, errors: list[str], show_all: bool = False):
        self.out, self.errors, self.show_all = out, errors, show_all
        self.line = ""  # the start of a line held back
        self.at_start = True
        self.after: list[str] | None = None  # text after an error line, once one was seen

    def write(self, text: str) -> None:
        if self.show_all:
            self.out.write(text)
        shown = []
        for part in re.split(r"(?<=[\r\n])", text):
            if not part:
                continue
            if self.after is not None:
                self.after.append(part)
                continue
            if not (self.at_start or self.line):
                shown.append(part)
                self.at_start = part.endswith(("\n", "\r"))
                continue
            line, self.line = self.line + part, ""
            if line.startswith(self.PREFIX):
                self.after = [line]
            elif not line.endswith(("\n", "\r")) and self.PREFIX.startswith(line):
                self.line = line
            else:
                shown.append(line)
                self.at_start = line.endswith(("\n", "\r"))
        if shown and not self.show_all:
            self.out.write("".join(shown))

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        """The end of the output: a held line is shown; an error line becomes its message."""
        if self.line and not self.show_all:
            self.out.write(self.line)
        if self.after is not None:
            self.errors.append(error_message("".join(self.after)))
        self.out.flush()




# Where a launcher's own report starts after our message: a traceback, an exception line,
# a bracketed log prefix, glog-style lines, or a blank line.
REPORT_START = re.compile(r"^(Traceback|\S+(Error|Exception)\b|\[|[EWI]\d{4} |\s*$)")


def error_message(text: str) -> str:
    """The message of an `error: ...` line and its continuation lines, without what a
    launcher printed after it."""
    lines = text.replace("\r", "\n").split("\n")
    message = [lines[0][len(ErrorLines.PREFIX):]]
    for line in lines[1:]:
        if REPORT_START.match(line):
            break
        message.append(line)
    return "\n".join(message).strip()
