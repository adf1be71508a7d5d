"""What ``hpipe analyze`` reads: documents (a folder of text files, or a JSONL file) and
questions. Everything that can be checked is checked here, before the first prompt: a bad JSONL
line is an error naming its number. A document that cannot be read is not: it becomes an
answer with status "error" and the job goes on."""

from __future__ import annotations

import html.parser
import json
from dataclasses import dataclass
from pathlib import Path

from hpipe.errors import InputFileError
from hpipe.textfile import read_text_file

TEXT_SUFFIXES = (".txt", ".md", ".html", ".htm")
# Past this a file is beyond any context (about 2M tokens); it is not read at all.
MAX_DOCUMENT_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Document:
    """One document: ``text``, or ``error`` saying why it could not be read; ``questions``
    its own (from a JSONL line), else None for the job's."""

    id: str
    text: str | None
    error: str | None = None
    questions: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Inputs:
    documents: tuple[Document, ...]
    skipped: tuple[str, ...]  # files of a folder that are not text, by relative path


def read_inputs(path: Path) -> Inputs:
    """A folder's text files (recursively, in name order) or a JSONL file's lines."""
    if path.is_dir():
        return _read_folder(path)
    if not path.exists():
        raise InputFileError(f"INPUT {str(path)!r}: no such file or folder")
    return Inputs(_read_jsonl(path), ())


def _read_folder(folder: Path) -> Inputs:
    docs, skipped = [], []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in f.relative_to(folder).parts):
            continue  # .git, editor swap files
        if f.suffix.lower() not in TEXT_SUFFIXES:
            skipped.append(rel)
            continue
        text, error = _read_document(f)
        docs.append(Document(rel, text, error))
    if not docs:
        listed = f" (it holds {len(skipped)} other files: {', '.join(skipped[:3])}" + \
            (", ..." if len(skipped) > 3 else "") + ")" if skipped else ""
        raise InputFileError(f"INPUT {str(folder)!r} has no {', '.join(TEXT_SUFFIXES)} files"
                             f"{listed}; point it at a folder of text documents or a JSONL file")
    return Inputs(tuple(docs), tuple(skipped))


def _read_document(f: Path) -> tuple[str | None, str | None]:
    """(text, None), or (None, why it cannot be read)."""
    try:
        size = f.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            return None, (f"{size / 2**20:.0f} MiB, far beyond any model's context; split it")
        data = f.read_bytes()
    except OSError as e:
        return None, f"cannot read it ({e.strerror or e})"
    if b"\x00" in data:
        return None, "a binary file, not text"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (byte {e.start}: {e.reason})"
    if f.suffix.lower() in (".html", ".htm"):
        text = html_to_text(text)
    if not text.strip():
        return None, "empty"
    return text, None


class _Text(html.parser.HTMLParser):
    SKIP = {"script", "style", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in ("p", "br", "div", "li", "h1", "h2", "h3", "h4", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """The readable text of an HTML page: tags, scripts and styles dropped."""
    parser = _Text()
    parser.feed(markup)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


def _read_jsonl(path: Path) -> tuple[Document, ...]:
    text = read_text_file(path, what="INPUT", error=InputFileError)
    label = f"INPUT {str(path)!r}"
    docs: list[Document] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{label} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputFileError(f"{where} is not JSON ({e.msg} at column {e.colno}); each line "
                                 'is {"id": ..., "text": ..., "questions": [...]}') from None
        if not isinstance(obj, dict):
            raise InputFileError(f"{where} is a JSON {type(obj).__name__}, not an object with "
                                 '"id" and "text"')
        unknown = sorted(set(obj) - {"id", "text", "questions"})
        if unknown:
            raise InputFileError(f"{where} has unknown field(s) {', '.join(unknown)}; a line "
                                 'holds "id", "text" and optionally "questions"')
        doc_id = obj.get("id")
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or doc_id == "":
            raise InputFileError(f'{where}: "id" must be a non-empty string or an integer, got '
                                 f"{doc_id!r}")
        doc_id = str(doc_id)
        if doc_id in seen:
            raise InputFileError(f'{where}: id {doc_id!r} was already used on line '
                                 f"{seen[doc_id]}; ids name the answers, so they must differ")
        seen[doc_id] = n
        body = obj.get("text")
        if not isinstance(body, str) or not body.strip():
            raise InputFileError(f'{where}: "text" must be a non-empty string')
        questions = obj.get("questions")
        if questions is not None:
            if (not isinstance(questions, list) or not questions
                    or not all(isinstance(q, str) and q.strip() for q in questions)):
                raise InputFileError(f'{where}: "questions" must be a non-empty list of '
                                     "non-empty strings")
            questions = _unique(q.strip() for q in questions)
        docs.append(Document(doc_id, body, None, questions))
    if not docs:
        raise InputFileError(f"{label} holds no documents; each line is "
                             '{"id": ..., "text": ...}')
    return tuple(docs)


def read_questions(given: list[str] | None, path: Path | None) -> tuple[str, ...]:
    """--question values and the lines of --questions FILE (blank lines and # comments
    skipped), in order, without repeats."""
    out = [q.strip() for q in given or []]
    if any(not q for q in out):
        raise InputFileError("--question is empty; ask something")
    if path is not None:
        text = read_text_file(path, what="--questions", error=InputFileError)
        lines = [line.strip() for line in text.splitlines()]
        from_file = [q for q in lines if q and not q.startswith("#")]
        if not from_file:
            raise InputFileError(f"--questions {str(path)!r} holds no questions (one per line)")
        out += from_file
    return _unique(out)


def _unique(items) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def pairs_of(inputs: Inputs, questions: tuple[str, ...]) -> list[tuple[Document, tuple[str, ...]]]:
    """Each document with the questions it gets: its own, else the job's. A document that
    gets none is an error here."""
    out = []
    for doc in inputs.documents:
        qs = doc.questions if doc.questions is not None else questions
        if not qs:
            raise InputFileError(f"document {doc.id!r} has no questions: give --question or "
                                 '--questions, or "questions" on its JSONL line')
        out.append((doc, qs))
    return out
