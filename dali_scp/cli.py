"""How every command-line tool ends on an error: one line on stderr naming the file and what is wrong,
exit status 2; ``--debug`` (or ``DALI_SCP_DEBUG=1``) re-raises, for the full traceback.

Why one place: bad input (a malformed JSON, a missing image, a foreign checkpoint) is the common case
of failure and its message is the one line a user needs; a Python traceback around it reads like a
bug in the tool and buries that line. DALI's errors are many lines of operator traceback and C++
context; ``describe`` keeps the operator and what it encountered.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys

DEBUG_ENV = "DALI_SCP_DEBUG"
_INPUT_ERRORS = (ValueError, OSError, RuntimeError)  # what our own checks raise for bad input


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (``prog: error: argument --x: ...``) without the usage
    block above it: the same one-line rule as every other error of these tools; --help shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


class Number:
    """An argparse ``type`` for a number in a range: ``Number(int, 1)`` is an integer >= 1, ``Number(float, 0, 1)``
    one in [0, 1], ``Number(float, 0, open_low=True)`` one > 0. Out of range, not a number, NaN or infinite
    -> argparse's one-line error naming the flag. Every numeric flag of every CLI takes one of these
    (tests/test_cli_numbers.py walks them all), so ``--batch-size 0`` or ``--max-iters -3`` never starts a run."""

    def __init__(self, kind: type, low=None, high=None, open_low: bool = False, multiple_of: int | None = None):
        self.kind, self.low, self.high, self.open_low, self.multiple_of = kind, low, high, open_low, multiple_of
        self.__name__ = self.describe()  # what argparse shows for this type

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            out = f"{what} in {'(' if self.open_low else '['}{self.low}, {self.high}]"
        elif self.low is not None:
            out = f"{what} {'>' if self.open_low else '>='} {self.low}"
        else:
            out = f"{what} <= {self.high}" if self.high is not None else what
        return out + (f", a multiple of {self.multiple_of}" if self.multiple_of else "")

    def __call__(self, text: str):
        try:
            v = self.kind(text)
        except (TypeError, ValueError):
            v = None
        ok = v is not None and (self.kind is int or math.isfinite(v))
        ok = ok and (self.low is None or (v > self.low if self.open_low else v >= self.low))
        ok = ok and (self.high is None or v <= self.high) and (not self.multiple_of or v % self.multiple_of == 0)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return v

    def __repr__(self):
        return f"Number({self.describe()})"


COUNT = Number(int, 1)                 # batch sizes, iterations, images, workers, threads, intervals
NON_NEGATIVE = Number(int, 0)          # warm-up batches, "0 = off" intervals
SEED = Number(int, 0, 2 ** 32 - 1)     # NumPy's seed range
FRACTION = Number(float, 0, 1)         # score thresholds
PIXELS = Number(int, 32)               # tile and canvas sides


def add_debug_flag(parser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"on an error, show the full traceback (also {DEBUG_ENV}=1)")


def add_dataset_flag(parser, default: str | None = "coco") -> None:
    """``--dataset``: which layout ``--coco-root`` holds (``dali_scp.dataset.DATASETS``); also which
    synthetic set stands in without it, and, for evaluation, which scorer."""
    parser.add_argument("--dataset", default=default, choices=("coco", "lvis"),
                        help="coco: DIR/annotations/instances_<split>.json and DIR/<split>/; lvis: LVIS v1's "
                             "DIR/annotations/lvis_v1_{train,val}.json beside COCO 2017's image folders, scored "
                             "with LVIS's federated rules (without --coco-root: the synthetic set of that kind)")


def debug_requested(argv=None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in args


def _dali_summary(msg: str) -> str | None:
    if "encountered:" not in msg:
        return None
    op = re.search(r"operator `([^`]+)`", msg)
    what = msg.split("encountered:", 1)[1].split("C++ context:", 1)[0]
    what = " ".join(what.replace("Current pipeline object is no longer valid.", "").split())
    out = f"DALI {op.group(1) if op else 'pipeline'}: {what}"
    if op and "decoders" in op.group(1):  # DALI's decoder does not name the file; the check does
        out += ("; an image that passed the dataset check no longer decodes (changed since?): "
                "`python -m dali_scp.check --coco-root DIR` names it")
    return out


def describe(e: BaseException) -> str:
    """One line: the message itself for the errors our checks raise, with the exception type for
    anything else (an unexpected error should not pass for a data problem)."""
    msg = str(e)
    msg = _dali_summary(msg) or "; ".join(line.strip() for line in msg.splitlines() if line.strip())
    if len(msg) > 1000:
        msg = msg[:1000] + " ..."
    msg = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in msg)  # names from files: no terminal escapes
    if not isinstance(e, _INPUT_ERRORS) or not msg:
        msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg


def run(main, argv=None) -> int:
    """Call ``main(argv)``; an exception becomes one ``error:`` line on stderr and status 2."""
    try:
        return main(argv)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:
        if debug_requested(argv):
            raise
        print(f"error: {describe(e)} (--debug or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        return 2
