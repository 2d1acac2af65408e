"""Text from a model, made safe for terminals, logs, JSON, XML and file names.

Node, tensor and class names, doc strings and metadata come from the model file, which may be
hostile. Before any of it reaches an output, the characters in :data:`UNSAFE` are escaped:
control characters (C0 including newline and tab, DEL, C1 0x80–0x9f), the bidirectional
controls that reorder what a terminal or a code review shows (U+061C, U+200E, U+200F,
U+202A–U+202E, U+2066–U+2069), the line and paragraph separators U+2028/U+2029, and lone
surrogates (undecodable bytes of a file name). :func:`clean` is the one sanitiser for text
(terminal, log, JUnit XML); :func:`json_escape` renders the same set as JSON ``\\u`` escapes
(lossless: a JSON reader gets the original string back); :func:`file_name` turns a name into a
safe, bounded file name.

>>> clean("relu\\x1b[31m\\n\\u202e")
'relu\\\\x1b[31m\\\\n\\\\u202e'
>>> file_name("../../etc/passwd")
'etc_passwd-3754d6cb'
>>> number(float("nan")), number(0.123456, ".3f"), number(None)
('n/a', '0.123', 'n/a')
"""

from __future__ import annotations

import hashlib
import math
import re

#: Characters never written as they are (see the module docstring).
_BEYOND_C0 = "\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
UNSAFE = re.compile(f"[\x00-\x1f{_BEYOND_C0}]")
#: What ``json.dumps`` leaves unescaped of :data:`UNSAFE` (it escapes C0 itself).
_UNSAFE_IN_JSON = re.compile(f"[{_BEYOND_C0}]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
#: Longest file name :func:`file_name` returns (well below the usual 255-byte limit).
MAX_FILE_NAME = 100
_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_EDGES = re.compile(r"^[._-]+")


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    if c in _NAMED:
        return _NAMED[c]
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def clean(text: object) -> str:
    """``str(text)`` with every :data:`UNSAFE` character written as a Python-style escape
    (``\\n``, ``\\x1b``, ``\\u202e``): one line of printable text. Idempotent."""
    return UNSAFE.sub(_escape, str(text))


def clean_block(text: object) -> str:
    """Like :func:`clean` for each line of a multi-line text: only the newlines between its
    lines are kept."""
    return "\n".join(clean(line) for line in str(text).split("\n"))


def json_escape(json_text: str) -> str:
    """JSON text with every :data:`UNSAFE` character left in it (``json.dumps(...,
    ensure_ascii=False)`` lets DEL, C1, bidi controls and lone surrogates through) as a
    ``\\uXXXX`` escape. Outside strings JSON is ASCII, so this changes no value."""
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", json_text)


def file_name(name: str, *, max_length: int = MAX_FILE_NAME) -> str:
    """A file name made from ``name`` (a node, output or class name from the model): only
    ``A-Z a-z 0-9 . _ -``, no leading dot or dash, at most ``max_length`` characters. A name
    that had to change gets ``-`` and 8 hex digits of its SHA-256, so distinct names stay
    distinct."""
    safe = _FILE_CHARS.sub("_", name).lstrip(".-")
    if safe == name and 0 < len(safe) <= max_length:
        return safe
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    stem = _EDGES.sub("", safe)[: max(1, max_length - 9)].rstrip("._-") or "_"
    return f"{stem}-{digest}"


def number(value: float | None, spec: str = ".4g") -> str:
    """``format(value, spec)``, or ``n/a`` for an undefined value (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    try:
        if math.isnan(float(value)):
            return "n/a"
    except (TypeError, ValueError):
        return str(value)
    return format(value, spec)
