"""Sizes and ages as people write them (SPEC §3): ``10GB``, ``500MiB``, ``30d``, ``12h``.

Sizes: a number with an optional unit; ``KB``/``MB``/``GB``/``TB`` are powers
of 1000, ``K``/``M``/``G``/``T`` and ``KiB``/``MiB``/... powers of 1024, ``B`` or
no unit bytes.  Ages: a number with ``s``, ``m``, ``h``, ``d`` or ``w``; a bare
number is seconds.  A bad value is ``InvalidInput`` (exit 2), raised before any
work is done.
"""

from __future__ import annotations

import math
import re

from .errors import InvalidInput

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_SIZE_RE = re.compile(rf"^\s*{_NUMBER}\s*([a-z]*)\s*$", re.IGNORECASE)
_AGE_RE = re.compile(rf"^\s*{_NUMBER}\s*([a-z]*)\s*$", re.IGNORECASE)

_SIZE_UNITS = {"": 1, "b": 1}
for _i, _letter in enumerate("kmgtpe", start=1):
    _SIZE_UNITS[_letter] = 1024**_i
    _SIZE_UNITS[_letter + "ib"] = 1024**_i
    _SIZE_UNITS[_letter + "b"] = 1000**_i

_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str | int) -> int:
    """Bytes in ``text`` (``"10GB"`` -> 10_000_000_000, ``"1K"`` -> 1024).

    Raises:
        InvalidInput: not a non-negative number with a known unit.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise InvalidInput(f"invalid size {text!r}: must not be negative", value=text)
        return text
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise InvalidInput(
            f"invalid size {text!r}: expected a number with an optional unit "
            "(B, K, KB, KiB, M, MB, MiB, G, GB, GiB, T...)",
            value=str(text),
        )
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_age(text: str | float) -> float:
    """Seconds in ``text`` (``"30d"``, ``"12h"``, ``"90"``).

    Raises:
        InvalidInput: not a non-negative number with s, m, h, d or w.
    """
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0 or not math.isfinite(text):
            raise InvalidInput(f"invalid age {text!r}: must be a finite number >= 0", value=text)
        return float(text)
    m = _AGE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _AGE_UNITS:
        raise InvalidInput(
            f"invalid age {text!r}: expected a number with s, m, h, d or w (e.g. 30d, 12h)",
            value=str(text),
        )
    return float(m.group(1)) * _AGE_UNITS[unit]
