"""Go's ``encoding/json.Marshal`` output, byte for byte, for the values Ollama's templates serialize.

Ollama renders tool definitions and tool-call arguments with Go's JSON encoder, which differs from
Python's ``json.dumps`` (and so from Jinja's ``tojson``): no spaces after ``,`` and ``:``; ``<``, ``>``,
``&``, U+2028 and U+2029 escaped as ``\\u003c`` etc.; numbers decoded into ``any`` are float64 (``1.0``
prints as ``1``); map keys sorted; struct fields in declaration order with ``omitempty`` dropping zero
values. Knowing the exact bytes is what lets the template-equivalence check demand exact equality.
"""
from __future__ import annotations

import math
from decimal import Decimal
from typing import Any


class GoStruct:
    """A Go struct value: ``FIELDS`` lists ``(json name, attribute, omitempty)`` in declaration order, where
    omitempty is False, ``"value"`` (a string, number, bool, slice or map field: dropped when zero or empty)
    or ``"nil"`` (a pointer or ``any`` field: dropped only when nil; ``any`` holding ``{}`` is written)."""

    FIELDS: tuple[tuple[str, str, bool | str], ...] = ()

    def go_json_fields(self) -> list[tuple[str, Any]]:
        out = []
        for key, attr, omitempty in self.FIELDS:
            v = getattr(self, attr)
            if (omitempty == "nil" and v is None) or (omitempty == "value" and _empty(v)):
                continue
            out.append((key, v))
        return out


class OrderedMap(dict):
    """A map that Ollama keeps in insertion order (its ``orderedmap``); a plain ``dict`` is a Go map,
    whose keys ``encoding/json`` sorts."""


def _empty(v: Any) -> bool:
    # encoding/json's omitempty for value fields: false, 0, "", and empty slices/maps (never a struct)
    if v is None or v is False:
        return True
    if isinstance(v, (int, float, str, list, tuple, dict)) and not isinstance(v, bool):
        return not v
    return False


_HEX = "0123456789abcdef"


def go_json_string(s: str) -> str:
    """A JSON string as Go writes it (HTML-safe escaping, ``\\b``/``\\f`` short forms as Go >= 1.22)."""
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\b":
            out.append("\\b")
        elif ch == "\f":
            out.append("\\f")
        elif o < 0x20 or ch in "<>&":
            out.append("\\u00" + _HEX[o >> 4] + _HEX[o & 0xF])
        elif o in (0x2028, 0x2029):
            out.append(f"\\u{o:04x}")
        elif 0xD800 <= o <= 0xDFFF:      # a lone surrogate is invalid UTF-8 in Go: replaced
            out.append("\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def go_json_number(v: float) -> str:
    """A number decoded into Go's ``any`` (float64) and marshalled: ``strconv`` ``'f'`` format in
    [1e-6, 1e21), else ``'e'`` with ``e-07`` cleaned to ``e-7``; shortest round-trip digits."""
    if isinstance(v, bool):
        raise TypeError("bool is not a number")
    f = float(v)
    if math.isnan(f) or math.isinf(f):
        raise ValueError(f"json: unsupported value: {f}")
    if f == 0:
        return "-0" if math.copysign(1, f) < 0 else "0"
    r = repr(f)                                   # shortest round-trip digits, as Go's -1 precision
    if 1e-6 <= abs(f) < 1e21:
        s = format(Decimal(r), "f")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
        return s
    mant, _, exp = format(Decimal(r), "e").partition("e")
    if "." in mant:
        mant = mant.rstrip("0").rstrip(".")
    sign, digits = (exp[0], exp[1:]) if exp[0] in "+-" else ("+", exp)
    digits = digits.lstrip("0") or "0"
    if len(digits) < 2:
        digits = "0" + digits
    if sign == "-" and digits.startswith("0"):
        digits = digits[1:]
    return f"{mant}e{sign}{digits}"


def go_json(v: Any) -> str:
    """``json.Marshal(v)`` as Go would produce it for the equivalent Go value."""
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, (int, float)):
        return go_json_number(v)
    if isinstance(v, str):
        return go_json_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(go_json(x) for x in v) + "]"
    if isinstance(v, OrderedMap):
        return "{" + ",".join(go_json_string(str(k)) + ":" + go_json(x) for k, x in v.items()) + "}"
    if isinstance(v, dict):
        return "{" + ",".join(go_json_string(str(k)) + ":" + go_json(v[k]) for k in sorted(v, key=str)) + "}"
    if hasattr(v, "go_json"):
        return v.go_json()
    if isinstance(v, GoStruct):
        return "{" + ",".join(go_json_string(k) + ":" + go_json(x) for k, x in v.go_json_fields()) + "}"
    raise TypeError(f"no Go JSON encoding for {type(v).__name__}")
