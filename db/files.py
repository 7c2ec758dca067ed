"""Files written for people (exports, the old script's JSON): whole or not at all, and CSV that stays data.

A file is written to a temporary file in its own folder, flushed to disk and renamed over the
target: a full disk or a kill leaves the previous file as it was (os.replace is atomic within one
file system), never a truncated one. A failed write names the file and, on a full disk, the space
it needed and what was free. The temporary file's name holds its writer's PID: the next write of the
same file removes what a killed writer left (`.name.PID.xxxx.partial`), never a live writer's. The file
gets the mode of the one it replaces, else the one `open` gives a new file (0666 less the umask), not the
temporary file's 0600, which would hide an export from the colleagues who share its folder.

CSV cells that a spreadsheet would run as a formula (OWASP's "CSV injection": text starting with
= + - @, a tab or a carriage return, e.g. a problem id `=HYPERLINK("http://x","y")`) get a leading
apostrophe, which spreadsheets show as nothing and read as "this is text". Only text cells:
numeric columns are left alone (-3.5 stays a number), and so is text that is just a number ("-12").
`raw=True` writers skip this for people who read the CSV with code.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import psutil
import pyarrow
import pyarrow.compute as pc

FORMULA_START = r"^[=+\-@\t\r]"  # OWASP: cells starting with these are formulas (or become one) in spreadsheets
PLAIN_NUMBER = r"^[+-]?[0-9][0-9,]*(\.[0-9]+)?([eE][+-]?[0-9]+)?$"  # "-12" is a number there, not a formula


class ExportError(OSError):
    """A file that could not be written; the message names it and says what to do."""


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically: a temporary file beside it, fsync, rename. Returns the path."""
    path = Path(path)
    _remove_leftovers(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial", dir=path.parent)
    try:
        os.chmod(temporary, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise ExportError(_failed(path, len(data), error)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut once the folder is synced
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return path


def _mode_for(path: Path) -> int:
    """Permission bits for the file written at `path`: those of the file it replaces, else a new file's."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    return 0o666 & ~_umask()


def _umask() -> int:
    """This process's umask, read without changing it where Linux says it (os.umask sets it to read it: a file
    another thread created in between would get the wrong mode)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, ValueError, StopIteration):
            with open("/proc/self/status") as status:
                return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_leftovers(path: Path) -> None:
    """Temporary files of earlier writes of `path` whose process is gone (killed mid-write)."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        pid = leftover.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            with contextlib.suppress(OSError):
                leftover.unlink()


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def _failed(path: Path, needed: int, error: OSError) -> str:
    kept = "the previous file is unchanged" if path.exists() else "nothing was written"
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        free = shutil.disk_usage(path.parent).free
        return (f"cannot write {path}: {error.strerror}: it needs {_size(needed)}, {_size(free)} free on "
                f"{path.parent}; free some space or pass another --out ({kept})")
    return f"cannot write {path}: {error.strerror or error} ({kept})"


def neutralise_formulas(table: pyarrow.Table) -> pyarrow.Table:
    """Every text cell that a spreadsheet would evaluate, prefixed with an apostrophe; other columns as they are."""
    for index, field in enumerate(table.schema):
        if not (pyarrow.types.is_string(field.type) or pyarrow.types.is_large_string(field.type)):
            continue
        column = table.column(index)
        risky = pc.and_(pc.match_substring_regex(column, FORMULA_START),
                        pc.invert(pc.match_substring_regex(column, PLAIN_NUMBER)))
        quoted = pc.binary_join_element_wise("'", column, "")
        table = table.set_column(index, field, pc.if_else(pc.fill_null(risky, False), quoted, column))
    return table
