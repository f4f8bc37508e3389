"""Reading the text files people write by hand (caption files): one rule for encodings.

Caption files come from many editors. Accepted: UTF-8 with or without a byte-order
mark, and UTF-16 with a byte-order mark (what Windows Notepad calls "Unicode"). Anything
else (latin-1, UTF-16 without a mark, binary) is refused with a message naming the file
and how to re-save it, never guessed: a wrong guess trains on garbled prompts.
Extract, the caption editor and training all read captions through `read_caption_file`.
"""

from __future__ import annotations

import codecs
import os

from dbtools.core.errors import UserError

_RESAVE = ("Open it in a text editor and save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 old.txt > new.txt`, "
           "or Notepad's 'Save as' with Encoding UTF-8).")


class CaptionEncodingError(UserError):
    """A caption file is not UTF-8 (with or without a BOM) or UTF-16 with a BOM."""


def decode_caption(data: bytes, path: str | os.PathLike = "caption file") -> str:
    """The text of a caption file's bytes; `CaptionEncodingError` naming `path` otherwise."""
    if data.startswith(codecs.BOM_UTF8):
        encoding, body = "utf-8", data[len(codecs.BOM_UTF8):]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding, body = "utf-16", data
    else:
        encoding, body = "utf-8", data
    if encoding == "utf-8" and b"\x00" in body:  # text never holds NULs; UTF-16 without a mark does
        raise CaptionEncodingError(f"{os.fspath(path)}: looks like UTF-16 without a byte-order mark. {_RESAVE}")
    try:
        return body.decode(encoding)
    except UnicodeDecodeError as exc:
        raise CaptionEncodingError(f"{os.fspath(path)}: not {encoding.upper()} text (byte {exc.start}). "
                                   f"{_RESAVE}") from None


def read_caption_file(path: str | os.PathLike) -> str:
    """The whole text of caption file `path` (see the module's encoding rule), not stripped."""
    with open(path, "rb") as f:
        return decode_caption(f.read(), path)
