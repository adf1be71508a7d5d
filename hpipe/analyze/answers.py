"""The answers file: one JSON line per (document, question), appended and flushed as each
answer finishes, so a killed job loses at most the answers in flight, and a rerun skips what
the file holds.

A kill can cut the last line short; reopening drops that partial line (and says so) before
appending. Any other line that is not an answer record is an error: the file is not ours to
overwrite without --overwrite.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from hpipe.errors import InputFileError, OutputPathError

FIELDS = ("id", "question", "answer", "status", "error", "prompt_tokens", "cached_tokens",
          "completion_tokens", "prefill_s", "decode_s")
STATUSES = ("ok", "too_long", "error")


def record(doc_id: str, question: str, *, status: str, answer: str | None = None,
           error: str | None = None, prompt_tokens: int | None = None, cached_tokens: int = 0,
           completion_tokens: int = 0, prefill_s: float | None = None,
           decode_s: float | None = None, finish_reason: str | None = None) -> dict:
    assert status in STATUSES, status
    out = {"id": doc_id, "question": question, "answer": answer, "status": status,
           "error": error, "prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens,
           "completion_tokens": completion_tokens,
           "prefill_s": None if prefill_s is None else round(prefill_s, 4),
           "decode_s": None if decode_s is None else round(decode_s, 4)}
    if finish_reason is not None:
        out["finish_reason"] = finish_reason
    return out


class AnswerFile:
    """Open with ``AnswerFile.open``; ``done`` holds the (id, question) pairs already answered."""

    def __init__(self, path: Path, handle, done: dict[tuple[str, str], dict],
                 dropped_partial: bool) -> None:
        self.path = path
        self._f = handle
        self.done = done
        self.dropped_partial = dropped_partial  # a cut last line was removed on opening
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, *, overwrite: bool = False) -> AnswerFile:
        if path.is_dir():
            raise OutputPathError(f"--out {str(path)!r} is a directory; name a .jsonl file")
        if not path.parent.is_dir():
            raise OutputPathError(f"--out {str(path)!r}: folder {str(path.parent)!r} does not "
                                  "exist; create it first")
        done: dict[tuple[str, str], dict] = {}
        dropped = False
        if path.exists() and not overwrite:
            done, keep_bytes = _read_existing(path)
            if keep_bytes is not None:  # a cut last line: drop it before appending
                os.truncate(path, keep_bytes)
                dropped = True
        try:
            handle = open(path, "w" if overwrite else "a", encoding="utf-8")
        except OSError as e:
            raise OutputPathError(f"--out {str(path)!r}: cannot write it "
                                  f"({e.strerror or e})") from None
        if not overwrite and handle.tell() > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # cut right after a whole record: end its line
                    handle.write("\n")
        return cls(path, handle, done, dropped)

    def write(self, rec: dict) -> None:
        """Append one answer and push it to the disk before returning."""
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())
            self.done[(rec["id"], rec["question"])] = rec

    def close(self) -> None:
        self._f.close()


def _read_existing(path: Path) -> tuple[dict[tuple[str, str], dict], int | None]:
    """The records of an existing file, and the length to cut it to when its last line was
    cut short by a kill (else None)."""
    data = path.read_bytes()
    done: dict[tuple[str, str], dict] = {}
    offset = 0
    lines = data.split(b"\n")
    for n, raw in enumerate(lines, 1):
        last = n == len(lines)
        if raw.strip():
            try:
                rec = json.loads(raw.decode("utf-8"))
                ok = isinstance(rec, dict) and isinstance(rec.get("id"), str) and \
                    isinstance(rec.get("question"), str) and rec.get("status") in STATUSES
            except (UnicodeDecodeError, json.JSONDecodeError):
                ok = rec = False
            if not ok:
                if last:  # no newline after it: the write was cut short
                    return done, offset
                raise InputFileError(
                    f"--out {str(path)!r} line {n} is not an answer record, so this is not a "
                    "file 'hpipe analyze' wrote; name another file, or pass --overwrite to "
                    "start it over")
            done[(rec["id"], rec["question"])] = rec
        offset += len(raw) + 1
    return done, None
