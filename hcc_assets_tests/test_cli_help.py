"""Every option of every `hcc-assets` command has help text, and the help shows its default."""

import argparse

from hcc_assets.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, name: str):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {command}")


def test_every_option_has_help_and_shows_its_default():
    missing, no_default = [], []
    for name, parser in _parsers(build_parser(), "hcc-assets"):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help:
                missing.append(f"{name} {action.dest}")
            elif action.option_strings and "default" not in parser._get_formatter()._expand_help(action):
                no_default.append(f"{name} {action.option_strings[0]}")
    assert missing == [] and no_default == [], (missing, no_default)


def test_new_commands_are_there():
    help_text = build_parser().format_help()
    assert "status" in help_text and "predict" in help_text
