"""Domain errors.

Every error a user can fix is a ``CustomKDError``: the CLI prints its message as one line on stderr
and exits 2. Each also subclasses the builtin that fits, so library callers can catch either.
Messages name the file, field or path, what was expected, and the fix.
"""

from __future__ import annotations


class CustomKDError(Exception):
    """A problem with the user's input (spec, dataset, weights, cache): exit status 2."""


class SpecError(CustomKDError, ValueError):
    """A spec file or ``--set`` override is invalid (unknown key, wrong type, bad value)."""


class DatasetError(CustomKDError, ValueError):
    """A dataset root is missing, has the wrong layout, or holds an unreadable image."""


class WeightsError(CustomKDError, FileNotFoundError):
    """Teacher or student weights cannot be found or loaded."""


class TeacherError(CustomKDError, ValueError):
    """The teacher cannot be built as asked (unknown model, feature kind it cannot give)."""


class StoreError(CustomKDError, RuntimeError):
    """A feature store is missing, incomplete, or does not match what was asked for."""


class RunDirError(CustomKDError, ValueError):
    """A run directory cannot be used as asked (unreadable or foreign checkpoint, other spec on resume)."""


class OutputError(CustomKDError, OSError):
    """An output file or directory cannot be written: a link or a file in the way, no space, no permission."""


class NonFiniteFeatureError(CustomKDError, FloatingPointError):
    """The teacher produced NaN or Inf features; the message names the sample ids."""


class NonFiniteLossError(CustomKDError, FloatingPointError):
    """A training loss became NaN or Inf; the message names the epoch, step and terms."""


def closest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """A ``" (did you mean 'x'?)"`` suffix naming the closest valid choice, or ``""``."""
    import difflib

    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (at most ``limit`` characters), else its
    type name: enough to say why, on one line."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(e).__name__
