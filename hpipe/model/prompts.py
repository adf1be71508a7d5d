"""How a question about a document is put to the model: one wording for the demo, ``hpipe run
--question`` and the document jobs, so all of them feed the model the same text."""

from __future__ import annotations


def document_question(document: str, question: str) -> str:
    """The user turn: the document, then the question (question last: small models follow it
    best)."""
    return (f"Read the following document and answer the question.\n\n{document.strip()}\n\n"
            f"Question: {question}\nAnswer in one sentence.")
