"""The small value checks that every part of the config's validation shares."""

from __future__ import annotations

import math

from .reader import _Errors


def _positive(where: str, value: object, errors: _Errors, *, allow_zero: bool = False) -> None:
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        errors.add(where, f"{value!r} must be {'non-negative' if allow_zero else 'positive'}")
