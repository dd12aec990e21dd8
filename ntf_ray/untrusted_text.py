r"""Text written by uploaders (object keys, uris, metadata) made safe to show to a person.

A key is any string an uploader chose. Control characters move a terminal's cursor or end a
line mid-key; format characters such as U+202E RIGHT-TO-LEFT OVERRIDE or U+2066-U+2069 (the
bidi isolates) make ``invoice\u202egpj.exe`` read as ``invoiceexe.jpg``; zero-width ones make
two different keys look alike. ``visible`` writes every such character as an escape a reader
sees, in Python's notation (``\u202e``, ``\x1b``), and a backslash as ``\\``, so two keys that
differ are shown differently and the text shown reads back to the key.
"""

from __future__ import annotations

import html
import re
import unicodedata

#: Unicode categories written as escapes: Cc (controls), Cf (format: bidi embeddings, overrides
#: and isolates, U+200E/U+200F marks, zero-width joiners), Cs (lone surrogates, as undecodable
#: bytes of a local file name come), Co (private use), Cn (unassigned) and the line and
#: paragraph separators Zl, Zp.
ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})

_SUSPECT = re.compile(r"[^\x20-\x5b\x5d-\x7e]")  # anything but printable ASCII less the backslash


def _escape(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if unicodedata.category(char) not in ESCAPED_CATEGORIES:
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text: str) -> str:
    """``text`` with its control, format, separator and unassigned characters as visible escapes."""
    return _SUSPECT.sub(lambda m: _escape(m.group()), text)


def html_text(value: object) -> str:
    """``str(value)`` for an HTML page: ``visible``, then HTML-escaped (quotes included)."""
    return html.escape(visible(str(value)))
