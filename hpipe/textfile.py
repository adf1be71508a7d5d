"""Reading a text input file the user named: one place that refuses a directory, a missing or
unreadable file, binary content or another encoding, with the flag and the path in the error."""

from __future__ import annotations

from pathlib import Path

from hpipe.errors import HPipeError

MAX_INPUT_BYTES = 64 * 2**20  # cluster, plan and profile files are kilobytes; refuse a disk image


def read_text_file(path: str | Path, *, what: str, error: type[HPipeError]) -> str:
    """The UTF-8 text of ``path``; ``what`` names it in errors (e.g. "--cluster"), raised as
    ``error`` (the kind of file's own error type)."""
    p = Path(path)
    label = f"{what} {str(p)!r}"
    if p.is_dir():
        raise error(f"{label} is a directory; give the file itself")
    if not p.is_file():
        raise error(f"{label}: no such file")
    try:
        size = p.stat().st_size
        if size > MAX_INPUT_BYTES:
            raise error(f"{label} is {size / 2**20:.0f} MiB, not a {what.lstrip('-')} file "
                        f"(those are a few KiB); check the path")
        data = p.read_bytes()
    except OSError as e:
        raise error(f"{label}: cannot read it ({e.strerror or e})") from None
    if b"\x00" in data:
        raise error(f"{label} is a binary file, not text; check the path")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{label} is not UTF-8 text (byte {e.start}: {e.reason}); check the path")\
            from None
