"""Strict command-line parsing: a mistyped flag is an error (exit 2) that names the closest valid flag.

No Beam import at module level (the query commands use :class:`ArgumentParser` without Beam). Pipeline
commands accept Beam's own flags too: :func:`parse_pipeline_args` splits ``argv`` into densebeam's
options and the Beam flags passed through, and refuses anything that is neither (argparse's prefix
matching is off, so ``--memory-budg`` is not silently taken for ``--memory-budget``).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import re
import sys
from typing import Iterable, Optional, Sequence


_MISSING = re.compile(r"the following arguments are required: (.+)$")
_STATES_DEFAULT = re.compile(r"\bdefaults?[: ]", re.IGNORECASE)  # "(default: X)", "default 512 on CPU"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default after its help (unless it says it already,
    or has none worth showing: an unset value, an off switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or _STATES_DEFAULT.search(text)
                or action.option_strings == [] or isinstance(action, argparse._HelpAction)):
            return text
        if isinstance(default, (list, tuple)):
            if not default:
                return text
            default = ",".join(map(str, default))
        return f"{text} (default: {default})" if text else f"(default: {default})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with prefix matching off, a "did you mean" for unknown flags, and defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def flags(self) -> list[str]:
        return sorted(o for a in self._actions for o in a.option_strings if o.startswith("--"))

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        """argparse's errors; a missing required flag also names the unknown flag that looks like it
        (argparse reports the missing flag before any unknown one: ``--inputs x`` left ``--input`` unset)."""
        missing = _MISSING.match(message)
        if missing:
            required = missing.group(1).split(", ")
            known = set(self.flags()) | (set(beam_flags()) if getattr(self, "passes_beam_flags", False) else set())
            for flag in dict.fromkeys(t.split("=", 1)[0] for t in getattr(self, "_argv", [])):
                if flag.startswith("--") and flag not in known:
                    close = closest_flag(flag, required)
                    if close:
                        message += f"; unrecognized argument {flag} (did you mean {close}?)"
        super().error(message)

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace=None):
        ns, rest = self.parse_known_args(args, namespace)
        if rest:
            self.fail_unknown(rest, self.flags())
        return ns

    def fail_unknown(self, unknown: Sequence[str], valid: Iterable[str]) -> None:
        """Exit 2 with one line per unknown flag and its closest valid spelling."""
        valid = sorted(set(valid))
        flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
        if not flags:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        parts = []
        for flag in dict.fromkeys(flags):
            close = closest_flag(flag, valid)
            parts.append(f"unrecognized argument {flag}" + (f" (did you mean {close}?)" if close else ""))
        self.error("; ".join(parts))


def closest_flag(flag: str, valid: Sequence[str]) -> Optional[str]:
    """The valid flag most like ``flag`` (dashes and underscores count as the same), if any is close."""
    norm = {v.replace("_", "-"): v for v in valid}
    match = difflib.get_close_matches(flag.replace("_", "-"), list(norm), n=1, cutoff=0.6)
    return norm[match[0]] if match else None


@functools.lru_cache(maxsize=1)
def _beam_parser() -> argparse.ArgumentParser:
    """Every flag of every Beam ``PipelineOptions`` class (all runners' options live in one module)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    p = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    for cls in sorted(set(subclasses(PipelineOptions)), key=lambda c: c.__qualname__):
        cls._add_argparse_args(p)
    return p


def beam_flags() -> list[str]:
    return sorted(o for a in _beam_parser()._actions for o in a.option_strings if o.startswith("--"))


def unknown_to_beam(args: Sequence[str]) -> list[str]:
    """The items of ``args`` that no Beam option takes (flags and the values that follow them)."""
    return _beam_parser().parse_known_args(list(args))[1]


def parse_pipeline_args(parser: ArgumentParser, argv: Optional[Sequence[str]]):
    """(densebeam options, Beam flags to pass through); exit 2 on a flag that is neither."""
    parser.passes_beam_flags = True  # its errors do not take a Beam flag for a typo
    args, rest = parser.parse_known_args(argv)
    unknown = unknown_to_beam(rest) if rest else []  # Beam's flags are read only when there are some
    if unknown:
        parser.fail_unknown(unknown, parser.flags() + beam_flags())
    return args, rest


def positive_int(text: str) -> int:
    """argparse ``type`` for counts that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
