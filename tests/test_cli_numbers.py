"""Every numeric flag of every command-line tool has a range: an out-of-range value, a non-number, NaN or
infinity ends the tool before it starts, with exit status 2 and one argparse-style line naming the flag.

The tools are found, not listed: every module of the project's packages and benchmarks/ that builds an
``ArgumentParser`` is imported and its ``main`` called with the parser's ``parse_args`` intercepted, so a new
tool is walked too; a numeric flag typed with bare ``int`` / ``float`` (no range) fails here.
"""
import argparse
import importlib
import re
from pathlib import Path

import pytest

from dali_scp import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dali_scp", "pipelines", "trainer", "benchmarks")  # scripts/: side-venv reference tools, not CLIs of the project


class _Parser(BaseException):
    def __init__(self, parser):
        self.parser = parser


def _modules() -> list:
    return sorted(str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                  if re.search(r"=\s*(cli|argparse)\.ArgumentParser\(", p.read_text()))


def _parser_of(rel: str, monkeypatch) -> argparse.ArgumentParser:
    mod = importlib.import_module(rel[:-3].replace("/", "."))

    def capture(self, *a, **k):
        raise _Parser(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(_Parser) as got:
        mod.main([])
    monkeypatch.undo()
    return got.value.parser


def _numeric(action) -> bool:
    if action.nargs == 0 or isinstance(action, argparse._HelpAction):
        return False
    if action.type in (int, float) or isinstance(action.type, cli.Number):
        return True
    d = action.default
    return action.type is None and isinstance(d, (int, float)) and not isinstance(d, bool)


def _bad_values(t: cli.Number) -> list:
    out = ["abc", "1e999999" if t.kind is float else "1.5"]
    if t.kind is float:
        out += ["nan", "inf"]
    if t.low is not None:
        out.append(str(t.low) if t.open_low else str(t.low - 1 if t.kind is int else t.low - 1e-6))
    if t.high is not None:
        out.append(str(t.high + 1 if t.kind is int else t.high + 1e-6))
    if t.multiple_of:
        out.append(str((t.low or 0) + t.multiple_of + 1))
    return out


def _good_value(t: cli.Number) -> str:
    v = t.low if t.low is not None else 0
    if t.open_low or (t.multiple_of and v % t.multiple_of):
        v = v + (t.multiple_of or (1 if t.kind is int else 0.5))
    return str(v)


def _required(parser) -> list:
    """Values for the positionals and required options, so a parse fails only on the flag under test."""
    out = []
    for g in parser._mutually_exclusive_groups:
        if g.required:
            out += [g._group_actions[0].option_strings[0], "x"]
    for a in parser._actions:
        if not a.option_strings and a.nargs not in ("?", "*"):
            out.append(a.choices[0] if a.choices else "x")
        elif a.required:
            out += [a.option_strings[0], a.choices[0] if a.choices else "x"]
    return out


MODULES = _modules()


def test_the_walk_finds_every_tool():
    for expected in ("trainer/run.py", "trainer/evaluate.py", "trainer/import_weights.py", "trainer/export_weights.py",
                     "trainer/showcase.py", "pipelines/profile.py", "pipelines/visualize.py", "pipelines/gpu_budget.py",
                     "dali_scp/check.py", "dali_scp/synthetic.py", "benchmarks/run_matrix.py"):
        assert expected in MODULES


@pytest.mark.parametrize("rel", MODULES)
def test_every_numeric_flag_rejects_out_of_range_values_in_one_line(rel, monkeypatch, capsys):
    parser = _parser_of(rel, monkeypatch)
    assert isinstance(parser, cli.ArgumentParser), f"{rel}: build the parser with dali_scp.cli.ArgumentParser"
    numeric = [a for a in parser._actions if _numeric(a)]
    for a in numeric:
        flag = a.option_strings[0] if a.option_strings else a.dest
        assert isinstance(a.type, cli.Number), f"{rel}: {flag} has no range: type it with a dali_scp.cli.Number"
        if a.default is not None and not isinstance(a.default, str):
            for d in (a.default if isinstance(a.default, list) else [a.default]):
                assert a.type(str(d)) == d, f"{rel}: {flag}'s default {d} is out of its own range"
        for bad in _bad_values(a.type):
            with pytest.raises(SystemExit) as e:  # --flag=value: "-1e-06" is a value, not an option
                parser.parse_args(_required(parser) + [f"{flag}={bad}"])
            assert e.value.code == 2, (rel, flag, bad)
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1, (rel, flag, bad, err)
            assert re.search(rf"error: argument {re.escape(flag)}\b.*must be", err), (rel, flag, bad, err)
        ok = parser.parse_args(_required(parser) + [f"{flag}={_good_value(a.type)}"])
        got = getattr(ok, a.dest)
        assert (got[0] if isinstance(got, list) else got) == a.type(_good_value(a.type))
    capsys.readouterr()


def test_the_two_flags_the_issue_names():
    from trainer.run import parse_args
    for argv in (["--batch-size", "0"], ["--max-iters", "-3"]):
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2


@pytest.mark.parametrize("t,good,bad", [
    (cli.COUNT, ["1", "7"], ["0", "-1", "2.0", "x", ""]),
    (cli.FRACTION, ["0", "0.5", "1", "1e-3"], ["-0.01", "1.01", "nan", "inf", "-inf"]),
    (cli.Number(float, 0, 1, open_low=True), ["1", "0.25"], ["0", "0.0"]),
    (cli.Number(int, 8, multiple_of=8), ["8", "1024"], ["0", "12", "4"]),
    (cli.SEED, ["0", str(2 ** 32 - 1)], ["-1", str(2 ** 32)]),
])
def test_number_ranges(t, good, bad):
    for v in good:
        assert t(v) == t.kind(float(v)) and type(t(v)) is t.kind
    for v in bad:
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            t(v)
