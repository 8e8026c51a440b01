"""argparse types of the command line: a bad option value is refused when parsed (exit 2, naming the option and
what is allowed)."""
from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 1")
    return value


def nonneg_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 0")
    return value


def seed_int(text: str) -> int:
    from ditgraft.utils import MAX_SEED

    value = _int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer in [0, {MAX_SEED}]")
    return value


def patch_grid(text: str) -> tuple[int, ...]:
    """A patch grid written HxW (rows x columns) or FxHxW (frames x rows x columns), e.g. 64x64 or 21x30x52."""
    parts = text.lower().split("x")
    if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: use HxW or FxHxW with sides >= 1, e.g. 64x64 or 21x30x52")
    return tuple(int(p) for p in parts)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not an integer") from None


def finite_float(low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False):
    """A float type for argparse: finite, within [low, high] (open ends when asked)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
        lo_ok = low is None or (value > low if low_open else value >= low)
        hi_ok = high is None or (value < high if high_open else value <= high)
        if not math.isfinite(value) or not lo_ok or not hi_ok:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
            rule = " and ".join(p for p in (lo, hi) if p)
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number" + (f" {rule}" if rule else ""))
        return value

    parse.__name__ = "number"
    return parse


DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto (cuda if available, else cpu)"


def add_device(parser: argparse.ArgumentParser, unset: str = "auto", default: str | None = None) -> None:
    """The one ``--device`` option (resolved by ``ditgraft.utils.resolve_device``). Its default None means ``unset``:
    auto, or the recipe's device for the commands that run recipes."""
    parser.add_argument("--device", default=default,
                        help=f"{DEVICE_HELP}; default {default or unset}".replace("%", "%%"))
