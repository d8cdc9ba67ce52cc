"""Errors a user can cause, and the one place that turns them into `error: ...` and exit status 2.

A user error (a bad flag, a missing or broken file, a busy or unwritable workdir, a full disk, a
run that cannot resume with these settings...) ends the run with one or two lines on stderr, what
is wrong and what to do, and exit status 2; no traceback. `--debug` (anywhere on the command line)
prints the traceback above those lines. Anything else is a bug and keeps its traceback.

What counts as a user error (`describe`):
  * `UserError` (raised by the preflight checks, the run lock, ...);
  * the project's own error types, each raised with a message meant for users:
    `distill.data.DataError`, `wan.checkpoint.CheckpointError`, `distill.distiller.TrainingError`,
    `distill.memory.MemoryPlanError`, `student_jax.checkpoint.NoCheckpointError`;
  * `SystemExit("error: ...")`, the older convention of config validation and the Distiller;
  * file-system failures that are the environment's, not the code's: no space left, quota,
    permission denied, read-only file system, a file where a folder should be (and the reverse).

`main(run, argv)` is the wrapper an entry point calls: `return errors.main(lambda args: ..., argv)`.
"""

from __future__ import annotations

import errno
import sys
import traceback
from typing import Callable

__all__ = ["EXIT_USER_ERROR", "UserError", "describe", "disk_full", "main"]

EXIT_USER_ERROR = 2  # what argparse and tyro use for usage errors: one status for everything the user can fix
DEBUG_FLAG = "--debug"
debug = False  # whether the running entry point got --debug (set by `main`; logging keeps tracebacks then)
INDENT = " " * len("error: ")

# (module, class): looked up in sys.modules only, so describing an error never imports torch or jax;
# an exception of a module that was never imported cannot be one of its classes.
_PROJECT_ERRORS = (
    ("distill.data", "DataError"),
    ("wan.checkpoint", "CheckpointError"),
    ("distill.distiller", "TrainingError"),
    ("distill.memory", "MemoryPlanError"),
    ("student_jax.checkpoint", "NoCheckpointError"),
)

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_FILESYSTEM_HINTS = {
    errno.ENOSPC: "free some space, or point --workdir / --data.cache_dir at a disk with room",
    errno.EDQUOT: "free some space, or point --workdir / --data.cache_dir at a disk with room",
    errno.EACCES: "choose a --workdir / --data.cache_dir you can write to",
    errno.EPERM: "choose a --workdir / --data.cache_dir you can write to",
    errno.EROFS: "choose a --workdir / --data.cache_dir on a writable disk",
    errno.ENOTDIR: "a part of this path is a file: choose another path",
    errno.EEXIST: "a file of that name is in the way: move it or choose another path",
    errno.EISDIR: "a folder is where a file should be: move it or choose another path",
}


class UserError(Exception):
    """Something the user can fix: `message` says what is wrong, `hint` what to do.

    quiet: print nothing (a rank of a torchrun job that fails because another rank reported the error)."""

    def __init__(self, message: str, hint: str = "", *, quiet: bool = False):
        super().__init__(message)
        self.message, self.hint, self.quiet = message, hint, quiet

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


def _lines(message: str) -> str:
    """`error: <first line>`, further lines indented under it."""
    text = str(message).strip()
    if text.startswith("error:"):
        text = text[len("error:"):].strip()
    first, *rest = [line.strip() for line in text.splitlines() if line.strip()] or ["(no message)"]
    return "\n".join([f"error: {first}", *(INDENT + line for line in rest)])


def _project_error_types() -> tuple[type, ...]:
    found = []
    for module_name, class_name in _PROJECT_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(getattr(module, class_name, None), type):
            found.append(getattr(module, class_name))
    return tuple(found)


def _chain(error: BaseException):
    """The exception, then its causes and contexts (a save error re-raised by a cleanup, an
    error wrapped by a library)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def disk_full(error: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT OSError in `error`'s chain, or None."""
    for item in _chain(error):
        if isinstance(item, OSError) and item.errno in _DISK_FULL:
            return item
    return None


def _filesystem(error: OSError) -> str:
    where = f": {error.filename}" if error.filename else ""
    if error.filename2:
        where += f" -> {error.filename2}"
    reason = error.strerror or str(error)
    return f"{reason}{where}\n{_FILESYSTEM_HINTS[error.errno]} (--debug shows where it happened)"


def describe(error: BaseException) -> str | None:
    """The lines to print for a user error (`error: ...`), or None when `error` is not one (a bug)."""
    if isinstance(error, UserError):
        return _lines(str(error))
    if isinstance(error, SystemExit):
        return _lines(error.code) if isinstance(error.code, str) else None
    if isinstance(error, _project_error_types()):
        return _lines(str(error))
    if isinstance(error, UnicodeDecodeError):
        return _lines(f"a text file is not UTF-8 ({error.reason} at byte {error.start})\n"
                      "save it as UTF-8 (--debug shows which file)")
    full = disk_full(error)
    if full is not None:
        return _lines(_filesystem(full))
    if isinstance(error, OSError) and error.errno in _FILESYSTEM_HINTS:
        return _lines(_filesystem(error))
    return None


def main(run: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run an entry point `run(argv)`; a user error prints its lines and returns EXIT_USER_ERROR.

    `--debug` is taken out of argv before `run` sees it; with it, a user error's traceback is printed
    above its lines. Any other exception (a bug) propagates with its traceback either way."""
    global debug
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        return int(run(argv) or 0)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return int(stop.code or 0)  # tyro / argparse: --help (0) or a usage error they printed (2)
        _report(stop, _lines(stop.code))
        return EXIT_USER_ERROR
    except Exception as error:  # noqa: BLE001 - sorted into user errors (printed) and bugs (re-raised)
        text = describe(error)
        if text is None:
            raise
        if not getattr(error, "quiet", False):
            _report(error, text)
        return EXIT_USER_ERROR


def _report(error: BaseException, text: str) -> None:
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
