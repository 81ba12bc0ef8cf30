"""Reading Beam flags that a user passed through (``--flag=v`` or ``--flag v``), shared by the presets."""

from __future__ import annotations

from typing import Optional, Sequence


def flag_value(beam_args: Sequence[str], flag: str) -> Optional[str]:
    """The value of ``--flag`` in ``beam_args``, or None."""
    for i, a in enumerate(beam_args):
        if a == flag and i + 1 < len(beam_args):
            return beam_args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def has_flag(beam_args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in beam_args)
