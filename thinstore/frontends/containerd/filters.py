"""containerd's filter syntax (its ``filters`` package), for List.

A request carries filters; a snapshot matches when any one of them matches.  A filter is
selectors joined by ``,`` (all must hold); a selector is a field path, optionally an
operator and a value::

    name==sha256:abc          kind==committed       parent!=""
    labels."containerd.io/gc.root"          labels.foo~=^ba     (~= is a regular expression)

Field paths: name, parent, kind, labels.KEY (KEY bare or double-quoted).  Values are bare
(up to the next ``,``) or double-quoted with backslash escapes.  A selector without an
operator asks that the field be present and non-empty.  Anything else raises UsageError,
which the service answers with InvalidArgument.
"""

from __future__ import annotations

import re

from thinstore.errors import UsageError

_OPS = ("==", "!=", "~=")


def compile_filters(filters: list[str]):
    """A predicate over info dicts (name, parent, kind, labels)."""
    alternatives = [_parse(f) for f in filters if f.strip()]
    if not alternatives:
        return lambda info: True
    return lambda info: any(all(sel(info) for sel in alt) for alt in alternatives)


def _parse(text: str) -> list:
    selectors, pos = [], 0
    while True:
        path, pos = _path(text, pos)
        op, value = None, None
        if text.startswith(_OPS, pos):
            op, pos = text[pos:pos + 2], pos + 2
            value, pos = _value(text, pos)
        selectors.append(_selector(path, op, value, text))
        if pos == len(text):
            return selectors
        if text[pos] != ",":
            raise UsageError(f"filter {text!r}: unexpected {text[pos]!r} at {pos}")
        pos += 1


def _quoted(text: str, pos: int) -> tuple[str, int]:
    out, pos = [], pos + 1
    while pos < len(text):
        ch = text[pos]
        if ch == "\\" and pos + 1 < len(text):
            out.append(text[pos + 1])
            pos += 2
        elif ch == '"':
            return "".join(out), pos + 1
        else:
            out.append(ch)
            pos += 1
    raise UsageError(f"filter {text!r}: unterminated quote")


def _path(text: str, pos: int) -> tuple[list[str], int]:
    parts = []
    while True:
        if pos < len(text) and text[pos] == '"':
            part, pos = _quoted(text, pos)
        else:
            m = re.compile(r"[A-Za-z0-9_./:-]*?(?=[.,=!~]|$)").match(text, pos)
            part, pos = m.group(0), m.end()
        if not part:
            raise UsageError(f"filter {text!r}: a field name is missing at {pos}")
        parts.append(part)
        if pos < len(text) and text[pos] == "." and not text.startswith(_OPS, pos):
            pos += 1
            continue
        return parts, pos


def _value(text: str, pos: int) -> tuple[str, int]:
    if pos < len(text) and text[pos] == '"':
        return _quoted(text, pos)
    end = text.find(",", pos)
    end = len(text) if end < 0 else end
    return text[pos:end], end


def _selector(path: list[str], op, value, text: str):
    field = path[0]
    if field == "labels" and len(path) == 2:
        def get(info):
            return info["labels"].get(path[1])
    elif field in ("name", "parent", "kind") and len(path) == 1:
        def get(info):
            return info[field]
    else:
        raise UsageError(f"filter {text!r}: unknown field {'.'.join(path)!r} (name, parent, "
                         "kind, labels.KEY)")
    if op is None:
        return lambda info: bool(get(info))
    if op == "~=":
        try:
            rx = re.compile(value)
        except re.error as err:
            raise UsageError(f"filter {text!r}: bad regular expression: {err}") from None
        return lambda info: get(info) is not None and rx.search(get(info)) is not None
    if op == "==":
        return lambda info: get(info) == value
    return lambda info: get(info) != value
