"""`updetr` alone lists every command; every command's --help ends with an example that parses."""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from updetr.cli import EXAMPLES, build_parser, command_parsers, main


def leaves(parser):
    return [(" ".join(path), sub) for path, _, sub in command_parsers(parser)
            if not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)]


def test_no_arguments_prints_the_command_table_and_exits_0():
    r = subprocess.run([sys.executable, "-m", "updetr"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    listed = [ln.strip().split("  ")[0] for ln in r.stdout.split("commands:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == [name for name, _ in leaves(build_parser())]
    assert "usage:" not in r.stdout


def test_every_command_has_an_example_that_parses(capsys):
    parser = build_parser()
    for name, sub in leaves(parser):
        group = name.split()[0]
        assert name in EXAMPLES or group in EXAMPLES, f"no example for `updetr {name}` (add it to EXAMPLES)"
        help_text = sub.format_help()
        assert "example" in help_text and "  updetr " in help_text, name
    for name, line in EXAMPLES.items():
        argv = shlex.split(line)[1:]
        args, extra = parser.parse_known_args(argv)           # SystemExit (exit 2) on an unknown flag
        assert not [e for e in extra if e.startswith("-")], (name, extra)
        assert getattr(args, "func", None) is not None, name


def test_example_lines_are_printed_whole(capsys):
    long = max(EXAMPLES.values(), key=len)
    name = next(k for k, v in EXAMPLES.items() if v == long)
    try:
        main([*name.split(), "--help"])
    except SystemExit:
        pass
    assert f"  {long}\n" in capsys.readouterr().out
