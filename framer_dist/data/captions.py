"""Captions JSONL: the one reader behind ``tools/caption.py`` (its resume), ``tools/encode_prompts.py``
and ``framer-sr --captions``.

A captions file holds one JSON object per line with an image id and its caption (``tools/caption.py``
writes ``{"id": ..., "caption": ...}``). One policy for every caller:

- lines end with ``\\n`` (``\\r\\n`` too); other Unicode line separators (U+2028, U+0085...) are
  text inside a caption, as ``json.dumps(..., ensure_ascii=False)`` writes them;
- blank (whitespace-only) lines are skipped;
- anything else is an error naming ``file:line``: bytes that are not UTF-8, a line that is not
  a JSON object, an object without an id or caption key, an id that is not a non-empty string, a
  caption that is not a string (an empty caption is a caption), and an id given twice (which of
  the two captions is meant cannot be guessed; the message names both lines).
"""

from __future__ import annotations

import json
from pathlib import Path

ID_KEYS = ("id",)
CAPTION_KEYS = ("caption",)


class CaptionsError(ValueError):
    """A captions file cannot be used; the message names the file (and line)."""


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")        # a BOM (Windows editors) is not part of line 1
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise CaptionsError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _show(value: object) -> str:
    """A JSON value for a message, cut short (a caption can be a paragraph)."""
    r = repr(value)
    return f"{type(value).__name__} {r if len(r) <= 60 else r[:57] + '...'}"


def _first(obj: dict, keys: tuple[str, ...]) -> tuple[str, object] | None:
    return next(((k, obj[k]) for k in keys if k in obj), None)


def read_captions(path: str | Path, id_keys: tuple[str, ...] = ID_KEYS,
                  caption_keys: tuple[str, ...] = CAPTION_KEYS) -> dict[str, str]:
    """``{id: caption}`` in file order. An object's id is under the first of ``id_keys`` it has,
    its caption under the first of ``caption_keys`` (framer-sr accepts a few common names; the
    training tools only ``id``/``caption``, the ids their data sources use)."""
    p = Path(path)
    if not p.is_file():
        raise CaptionsError(f"captions file not found: {p}")
    out: dict[str, str] = {}
    line_of: dict[str, int] = {}
    # split on "\n" only: str.splitlines() would also split at U+2028, U+0085, \x0c... inside a caption
    for n, line in enumerate(_decode(p).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CaptionsError(f"{p}:{n}: not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise CaptionsError(f"{p}:{n}: expected a JSON object, got {type(obj).__name__}")
        key, text = _first(obj, id_keys), _first(obj, caption_keys)
        if key is None or text is None:
            raise CaptionsError(f"{p}:{n}: expected an id ({'/'.join(id_keys)}) and a caption "
                                f"({'/'.join(caption_keys)}), got keys {sorted(obj)}")
        if not isinstance(key[1], str) or not key[1]:
            raise CaptionsError(f"{p}:{n}: {key[0]!r} must be a non-empty string, got {_show(key[1])}")
        if not isinstance(text[1], str):
            raise CaptionsError(f"{p}:{n}: {text[0]!r} must be a string, got {_show(text[1])}")
        if key[1] in out:
            raise CaptionsError(f"{p}:{n}: id {key[1]!r} already has a caption on line "
                                f"{line_of[key[1]]}; keep one of the two lines")
        out[key[1]], line_of[key[1]] = text[1], n
    return out
