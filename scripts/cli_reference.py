"""Print the "every flag" part of docs/cli.md from the parser itself (python scripts/cli_reference.py);
tests/test_docs.py fails when a flag is missing from that file."""
import argparse

from earlybird.cli import COMMANDS, build_parser


def main() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    print("## Every flag, by command\n")
    print("Generated from the parser by `python scripts/cli_reference.py`; `earlybird COMMAND --help` says the same.\n")
    for name, sub in commands.items():
        print(f"### `earlybird {name}`: {COMMANDS[name].help}\n")
        rows = [a for a in sub._actions if a.dest != "help"]  # positional arguments first, as --help lists them
        rows.sort(key=lambda a: bool(a.option_strings))
        if not rows:
            print("No flags.\n")
            continue
        print("| flag | meaning |\n|---|---|")
        for action in rows:
            flags = ", ".join(f"`{f}`" for f in action.option_strings) or f"`{action.metavar or action.dest}`"
            text = (action.help or "").replace("%%", "%").replace("|", "\\|")
            print(f"| {flags} | {text} |")
        print()


if __name__ == "__main__":
    main()
