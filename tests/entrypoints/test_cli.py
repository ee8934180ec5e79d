"""`sluice` command line: a named subcommand imports its own module alone; bare `sluice` lists them all."""
from __future__ import annotations

import subprocess
import sys

from sluice.entrypoints.cli import build_parser

CHECK = """
import sys
from sluice.entrypoints.cli import build_parser
build_parser(["generate", "--help"])
print(sorted(m for m in ("sluice.entrypoints.openai.api_server", "sluice.bench.cli", "sluice.entrypoints.chat",
                         "sluice.entrypoints.generate") if m in sys.modules))
"""


def test_a_named_subcommand_imports_only_its_module():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['sluice.entrypoints.generate']"


def test_without_a_subcommand_every_one_is_listed():
    help_text = build_parser([]).format_help()
    choices = build_parser(["--help"])._subparsers._group_actions[0].choices
    assert set(choices) == {"serve", "generate", "chat", "bench"}
    assert "{serve,generate,chat,bench}" in help_text
