"""Cache keys exactly as the pipeline's TypeScript computes them (spec section 4.2):

    crypto.createHash('md5').update(JSON.stringify({ url, ...params })).digest('hex')

so entries written by either side are found by the other. That needs JavaScript's own rules:
object keys that are array indices ("0", "7") come first in ascending order, then the others in
insertion order (a `url` among the params keeps the first place and takes the param's value);
numbers print as `Number.prototype.toString` does (`1e21`, `1e-7`, no `.0`); strings escape only
quotes, backslashes, control characters and lone surrogates; no spaces anywhere; the result is
hashed as UTF-8.
"""

from __future__ import annotations

import decimal
import hashlib
import math
from typing import Any, Mapping

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def cache_key(url: str, params: Mapping[str, Any] | None = None) -> str:
    """The md5 hex key of `url` with `params`, as the spec's `generateCacheKey` computes it."""
    obj: dict[str, Any] = {"url": url}
    obj.update(params or {})
    return hashlib.md5(stringify(obj).encode("utf-8")).hexdigest()


def stringify(value: Any) -> str:
    """`JSON.stringify(value)` for JSON-like Python values (dict, list, tuple, str, int, float,
    bool, None)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (int, float)):
        return _number(value)
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
        index_keys = sorted((k for k, _ in items if _is_array_index(k)), key=int)
        ordered = [(k, value_of) for k in index_keys for key, value_of in items if key == k]
        ordered += [(k, v) for k, v in items if not _is_array_index(k)]
        return "{" + ",".join(f"{_string(k)}:{stringify(v)}" for k, v in ordered) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(stringify(v) for v in value) + "]"
    raise TypeError(f"cannot put a {type(value).__name__} in a cache key")


def _is_array_index(key: str) -> bool:
    return key.isascii() and key.isdigit() and (key == "0" or key[0] != "0") and int(key) < 2**32 - 1


def _string(text: str) -> str:
    out = ['"']
    i, end = 0, len(text)
    while i < end:
        ch = text[i]
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xD800 <= code <= 0xDBFF and i + 1 < end and 0xDC00 <= ord(text[i + 1]) <= 0xDFFF:
            # A high and a low surrogate side by side are one character to JavaScript.
            out.append(chr(0x10000 + ((code - 0xD800) << 10) + ord(text[i + 1]) - 0xDC00))
            i += 1
        elif code < 0x20 or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")  # control characters and lone surrogates
        else:
            out.append(ch)
        i += 1
    out.append('"')
    return "".join(out)


def _number(number: int | float) -> str:
    if isinstance(number, int) and abs(number) < 2**53:
        return str(number)
    x = float(number)
    if not math.isfinite(x):
        return "null"
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    # repr gives the shortest digits that round-trip, as ECMAScript's algorithm requires.
    digits_tuple, exponent = decimal.Decimal(repr(abs(x))).as_tuple()[1:]
    digits = "".join(map(str, digits_tuple)).rstrip("0") or "0"
    exponent += len("".join(map(str, digits_tuple))) - len(digits)
    k = len(digits)
    n = exponent + k  # the value is 0.digits × 10^n
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * (-n) + digits
    e = n - 1
    mantissa = digits[0] + ("." + digits[1:] if k > 1 else "")
    return f"{sign}{mantissa}e{'+' if e >= 0 else '-'}{abs(e)}"
