"""The `photon` entry point: runs the app; a mistake the user can fix is one line and exit code 2.

A `UserError` (bad input the user can fix) is printed as one line and exits with code 2; `--debug` shows
the traceback. Every verb has `--help`.
"""

from __future__ import annotations

import errno
import os
import sys

from rich.markup import escape

from photon.cli.common import STATE, app, err_console

# isort: off
# Each group registers its commands on import, in the order `photon --help` lists them.
from photon.cli import train  # noqa: F401, E402
from photon.cli import deploy  # noqa: F401, E402
from photon.cli import bench  # noqa: F401, E402
# isort: on
from photon.errors import UserError


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        app()
    except UserError as e:
        if STATE["debug"]:
            raise
        # soft_wrap: one line at any terminal width; escape: a path like data/[v2] is printed as typed.
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as e:  # the machine's limits (disk, memory) and a path the user gave: one line too
        line = None if STATE["debug"] else environment_error(e)
        if line is None:
            raise
        err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        from photon.launch.simulation import exit_after_interrupt

        err_console.print("interrupted")
        exit_after_interrupt(130)


_PATH_HINTS = {PermissionError: "choose a path you can write (or read), or fix its permissions",
               FileExistsError: "a file is in the way of a folder (or the reverse); choose another path",
               NotADirectoryError: "a part of the path is a file, not a folder; choose another path",
               IsADirectoryError: "a folder is where a file should be; choose another path",
               FileNotFoundError: "check the path (relative paths start from the current folder)"}
_DISK_HINTS = {errno.ENOSPC: "the disk is full: free space there or choose another place",
               errno.EDQUOT: "the disk quota is used up: free space there or choose another place",
               errno.EROFS: "that file system is read-only: choose a writable place"}
_WHERE = " (photon --debug COMMAND shows where)"
_OUT_OF_MEMORY = ("out of memory: the model or the batch is too large for this machine; lower train.batch_size (or "
                  "set train.micro_batch_size), or use a smaller preset (README's presets table gives the memory a "
                  "client needs)")


def environment_error(e: Exception) -> str | None:
    """An error from the machine's limits or a path the user gave, as one line (what, and what to do); None for
    anything else (a bug: its traceback is shown)."""
    if isinstance(e, OSError) and e.errno in _DISK_HINTS:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}; {_DISK_HINTS[e.errno]}{_WHERE}"
    if type(e) in _PATH_HINTS and e.filename is not None:  # one with no path is not a path the user gave: a bug
        path = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        return f"{path}: {e.strerror or e}; {_PATH_HINTS[type(e)]}{_WHERE}"
    text = str(e)
    if type(e).__name__ == "SafetensorError":  # safetensors' writer reports the OS error in its message
        code = next((c for c in _DISK_HINTS if f"os error {c})" in text), None)
        if code is not None:
            return f"writing a checkpoint: {os.strerror(code)}; {_DISK_HINTS[code]}{_WHERE}"
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
            isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)):
        return f"{_OUT_OF_MEMORY}{_WHERE}"
    return None

