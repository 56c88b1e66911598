"""The subcommand table (``etbench.cli.COMMANDS``) and the parser agree: every entry appears in ``--help`` of its
level with its help line, parsing its name (with dummy values for what it requires) dispatches to its handler, and
the parser has no subcommand the table lacks."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from etbench.cli import COMMANDS, Command, Group, build_parser

REPO = Path(__file__).resolve().parents[1]


def _leaves(entries: tuple[Command | Group, ...], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Command]]:
    out: list[tuple[tuple[str, ...], Command]] = []
    for e in entries:
        out += _leaves(e.commands, (*path, e.name)) if isinstance(e, Group) else [((*path, e.name), e)]
    return out


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _parser_at(path: tuple[str, ...]) -> argparse.ArgumentParser:
    p = build_parser()
    for name in path:
        p = _subparsers(p)[name]
    return p


def _required_dummies(p: argparse.ArgumentParser) -> list[str]:
    """Values for a parser's required positionals and options, so that parsing gets as far as the handler."""
    out: list[str] = []
    for a in p._actions:
        if not a.option_strings and a.nargs not in ("?", "*") and not isinstance(a, argparse._SubParsersAction):
            out.append("x")
        elif a.option_strings and a.required:
            out += [a.option_strings[0], "x"]
    return out


LEAVES = _leaves(COMMANDS)


def test_the_table_is_the_parser() -> None:
    """Every level of the parser offers exactly the names the table lists there, in the table's order."""
    def check(entries: tuple[Command | Group, ...], p: argparse.ArgumentParser, where: str) -> None:
        subs = _subparsers(p)
        assert list(subs) == [e.name for e in entries], where
        for e in entries:
            if isinstance(e, Group):
                check(e.commands, subs[e.name], f"{where} {e.name}")
            else:
                assert not [a for a in subs[e.name]._actions if isinstance(a, argparse._SubParsersAction)]

    check(COMMANDS, build_parser(), "etbench")
    assert len(LEAVES) == 17 and len({h.run for _, h in LEAVES}) == 16  # train image and graph share one function


@pytest.mark.parametrize("path, command", LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_every_subcommand_dispatches_to_its_handler(path: tuple[str, ...], command: Command) -> None:
    args = build_parser().parse_args([*path, *_required_dummies(_parser_at(path))])
    assert args.func is command.run


def test_help_lists_every_subcommand_with_its_help_line() -> None:
    """``etbench --help`` (a real process) and each group's help name every entry with the table's help text."""
    out = subprocess.run([sys.executable, "-m", "etbench", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    levels: list[tuple[str, tuple[Command | Group, ...]]] = [(out.stdout, COMMANDS)]
    levels += [(_parser_at((g.name,)).format_help(), g.commands) for g in COMMANDS if isinstance(g, Group)]
    for text, entries in levels:
        flat = " ".join(text.split())
        for e in entries:
            assert e.name in text.split("{", 1)[1].split("}", 1)[0].split(","), (e.name, text)
            assert f"{e.name} {' '.join(e.help.split())}" in flat, (e.name, flat)
