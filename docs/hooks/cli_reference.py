"""MkDocs hook: the CLI reference page is generated from evomerge's argument parser.

A page that holds the line ``<!-- evomerge-cli -->`` gets, in its place, one section per verb of
``evomerge.cli.build_parser()``: its description, its usage line and a table of its arguments. The
reference cannot drift from the parser: it is the parser, read at build time.
"""

from __future__ import annotations

import argparse
from typing import Any

MARKER = "<!-- evomerge-cli -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(action: argparse.Action) -> str:
    if action.required or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
        return ""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return ""
    if action.default in (None, argparse.SUPPRESS):
        return ""
    return f"`{action.default}`"


def _name(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(f"`{o}`" for o in action.option_strings)
        if action.nargs != 0:
            metavar = action.metavar or action.dest.upper()
            if action.choices:
                metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
            names += f" `{metavar}`"
        return names
    return f"`{action.metavar or action.dest}`"


def _section(name: str, parser: argparse.ArgumentParser) -> str:
    lines = [f"## `evomerge {name}`", ""]
    if parser.description:
        lines += [parser.description, ""]
    usage = parser.format_usage().strip().removeprefix("usage: ")
    lines += ["```text", usage, "```", ""]
    rows = [
        a
        for a in parser._actions
        if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
    ]
    if rows:
        lines += ["| argument | default | meaning |", "|---|---|---|"]
        for a in rows:
            text = parser._get_formatter()._expand_help(a) if a.help else ""
            lines.append(f"| {_name(a)} | {_default(a)} | {_cell(text)} |")
        lines.append("")
    return "\n".join(lines)


def cli_markdown() -> str:
    """The reference of every ``evomerge`` verb, as Markdown."""
    from evomerge.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in verbs._choices_actions}
    out = ["| verb | what it does |", "|---|---|"]
    out += [f"| [`{n}`](#evomerge-{n}) | {_cell(helps.get(n) or '')} |" for n in verbs.choices]
    out.append("")
    out += [_section(n, p) for n, p in verbs.choices.items()]
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_markdown())
