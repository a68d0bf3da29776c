"""The command-line reference page, generated from the parser itself:
``python -m looptrace.apps.cli_reference docs/reference/cli.md`` (``make docs`` runs it; a test checks
the committed page is current)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from looptrace.cli import build_parser
from looptrace.io import atomic_write_bytes


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.dest}`"
    return ", ".join(f"`{s}`" for s in action.option_strings)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def reference_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """Every subcommand with its help, arguments, choices and defaults, as Markdown."""
    parser = parser or build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    lines = [
        "# Command line",
        "",
        "`looptrace <command> --help` prints the same. Every command saves its configuration beside its outputs;",
        "errors are one line on stderr and exit status 2.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    lines += [f"| [`{name}`](#{name}) | {_cell(helps.get(name, ''))} |" for name in sub.choices]
    for name, p in sub.choices.items():
        lines += [
            "",
            f"## {name}",
            "",
            _cell(helps.get(name, "")),
            "",
            "| argument | help | default |",
            "|---|---|---|",
        ]
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = _cell(action.help or "")
            if action.choices is not None:
                text += f" Choices: {', '.join(f'`{c}`' for c in action.choices)}."
            default = (
                ""
                if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or not action.option_strings
                else f"`{action.default}`"
            )
            lines.append(f"| {_flags(action)} | {text} | {default} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    text = reference_markdown()
    if argv:
        atomic_write_bytes(Path(argv[0]), text.encode())
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
