"""What every mgie command shares: a one-line-error argparse, ranged number types, the error exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2."""

    def error(self, message: str):
        """Print the usage error on one line and exit with status 2."""
        self.exit(2, f"error: {message} (see --help)\n")


def ranged(kind: type, lo: float, hi: float = float("inf")) -> Callable[[str], float]:
    """An argparse type: ``kind(text)`` within ``[lo, hi]``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside [{lo}, {hi}]")
        return value

    return parse


def error_line(e: BaseException) -> str:
    """``error: <message on one line>``."""
    return f"error: {' '.join(str(e).split()) or type(e).__name__}"


def run_command(fn: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Run ``fn``; bad input (``ValueError``/``OSError``) -> one ``error:`` line and exit 2, Ctrl-C -> 130."""
    try:
        return fn()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(error_line(e), file=sys.stderr)
        return 2
