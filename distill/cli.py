"""The `wan-distill` console command: `wan-distill train|sample|evaluate|export [options]`.

Each subcommand is the module entry it names, with its own `--help`:

    train     distil the teacher into a student (what `python train.py` runs; `--help`: every option)
    sample    draw images with a run's EMA student (`python -m distill.sample`)
    evaluate  score a run's latest checkpoint against its teacher (`python -m distill.evaluate`)
    export    write a run's EMA student as safetensors + config.json (`python -m distill.export`)

Every subcommand reports an error the user can fix as `error: ...` with exit status 2 and no
traceback (`distill.errors`; `--debug` shows it). Owns the dispatch and `ArgumentParser`, the
argparse of the subcommands written here, whose usage errors are one such line too.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import sys

from . import errors

__all__ = ["COMMANDS", "ArgumentParser", "main"]

# name -> ("module:function" taking argv and returning an exit status, one-line summary); imported on use
COMMANDS = {
    "train": ("distill.cli:train_main", "distil the teacher into a student (python train.py)"),
    "sample": ("distill.sample:main", "draw images with a run's EMA student"),
    "evaluate": ("distill.cli:evaluate_main", "score a run's latest checkpoint against its teacher"),
    "export": ("distill.export:main", "write a run's EMA student as model.safetensors + config.json"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors as one line `error: ... (see --help)`, exit status 2, no usage dump."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def train_main(argv: list[str] | None = None) -> int:
    """What train.py's main runs: parse the flags (tyro: `--help` lists every option) and train.

    train.py sits beside the package, not in it, so an installed `wan-distill` cannot import it."""

    def run(args: list[str]) -> int:
        from .config import parse
        from .loop import train

        train(parse(args))
        return 0

    return errors.main(run, argv)


def evaluate_main(argv: list[str] | None = None) -> int:
    """`distill.evaluate`'s main with user errors reported (`distill.errors`)."""
    from . import evaluate

    return errors.main(evaluate.main, argv)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return ("usage: wan-distill {" + ",".join(COMMANDS) + "} [options]\n\n"
            "Distil Wan2.2 T2V-A14B into a Flax image student, and use the student.\n\ncommands:\n"
            + "\n".join(lines) + "\n\n`wan-distill COMMAND --help` lists the options of each.")


def main(argv: list[str] | None = None) -> int:
    """`wan-distill COMMAND ...`: the exit status of the subcommand (each reports its own errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        sys.stderr.write(f"error: unknown command {command!r}{hint}; choose one of {', '.join(COMMANDS)}\n")
        return errors.EXIT_USER_ERROR
    module, function = COMMANDS[command][0].split(":")
    entry = getattr(importlib.import_module(module), function)
    named = {"prog": f"wan-distill {command}"} if "prog" in inspect.signature(entry).parameters else {}
    return int(entry(rest, **named) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
