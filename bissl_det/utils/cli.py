"""Command-line help shared by the tools: what the tool does, then an example, first."""

from __future__ import annotations

import argparse


def split_doc(doc: str) -> tuple[str, str]:
    """A tool docstring as (what it does up to its first example command, the rest).

    The first part ends with the first paragraph that holds an indented (command) line.
    """
    paragraphs = doc.strip("\n").split("\n\n")
    for i, paragraph in enumerate(paragraphs):
        if any(line.startswith((" ", "\t")) for line in paragraph.splitlines()):
            return "\n\n".join(paragraphs[: i + 1]), "\n\n".join(paragraphs[i + 1 :])
    return paragraphs[0], "\n\n".join(paragraphs[1:])


def describe(parser: argparse.ArgumentParser, doc: str) -> argparse.ArgumentParser:
    """Give ``parser`` the tool's docstring: what it does and an example right under the usage
    line (the description), the rest after the options (the epilog).

    detectron2's ``default_argument_parser`` otherwise prints its own ``train_net.py`` examples.
    """
    parser.description, parser.epilog = split_doc(doc)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser
