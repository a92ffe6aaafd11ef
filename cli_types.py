"""argparse types for numeric flags: a bad value stops the script with argparse's usage line and one message naming the
flag and the value, before anything is read or written.

    parser.add_argument("--frames", type=positive_int, default=100)
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--frames", type=int_list, default="0")          # 0,10,39
    parser.add_argument("--range", type=frame_range, default=None)       # START:STOP
"""
import argparse
import math
import sys


def _int(text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (nan, inf, 0 and negatives refused)."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """Comma-separated integers >= 0, such as frame numbers: '0,10,39'."""
    parts = [part.strip() for part in str(text).split(",")]
    if not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers of at least 0 (0,10,39), got {text!r}")
    return [int(part) for part in parts]


def frame_range(text: str) -> range:
    """START:STOP, frames START up to STOP - 1 (Python's slice rule), START >= 0 and STOP > START; 'START:' (to the
    end) is not a range of known length and is refused."""
    start, colon, stop = str(text).partition(":")
    if not colon or not start.strip().isdigit() or not stop.strip().isdigit() or int(stop) <= int(start):
        raise argparse.ArgumentTypeError(f"expected START:STOP with 0 <= START < STOP (0:100), got {text!r}")
    return range(int(start), int(stop))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with the description as written and every flag's default, where the help does not already say it and
    there is one (not for switches and for flags without a value)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class Renamed(argparse.Action):
    """Stores the value as argparse's default action does; an old spelling of the flag (any of its option strings
    but the first) still works for one release and prints a deprecation line naming the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string and option_string != self.option_strings[0]:
            print(f"note: {option_string} is deprecated, use {self.option_strings[0]}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_test_flips(parser: argparse.ArgumentParser):
    """--test_flips, as inference.py and segment.py take it (unet.load_model's test_flips)."""
    parser.add_argument("--test_flips", default="auto", choices=("auto", "on", "off"),
                        help="average the logits over the four mirror images of each frame (four passes): auto takes "
                             "what the model's recipe chose (default %(default)s)")
