"""The one error type fastdiff raises for bad input, and small checks that raise it.

Every message names what was expected and what was given. The command line turns an
:class:`InputError` into a one-line message and exit code 2 instead of a stack trace.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class InputError(ValueError):
    """Bad input from a user: a wrong shape, an unknown name, a value out of range, a missing file."""


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise naming all of them."""
    choices = tuple(choices)
    if value not in choices:
        raise InputError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def check_in_range(name: str, values: Tensor, low: float, high: float, *, rel_tol: float = 1e-6) -> None:
    """Raise unless every value lies in ``[low, high]`` (up to ``rel_tol`` for float rounding). Never clamps."""
    values = torch.as_tensor(values)
    if values.numel() == 0:
        return
    if torch.isnan(values).any():
        raise InputError(f"{name} contains NaN; expected values in [{low:.6g}, {high:.6g}]")
    lo, hi = values.min().item(), values.max().item()
    if lo < low - rel_tol * abs(low) or hi > high + rel_tol * abs(high):
        raise InputError(f"{name} must lie in [{low:.6g}, {high:.6g}]; got values in [{lo:.6g}, {hi:.6g}]")
