"""The demo: SmolLM2 answers a question about a long document (data/metric_system.md).

The document and the question live here; the prompt's wording is ``hpipe.model.prompts``'s,
shared with ``hpipe run --question``. The pipelined demo is an ``hpipe run`` (see cli.py), and
``--single-process`` runs the same prompt in one process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from hpipe.model.prompts import document_question

# An original document written for hpipe and released CC0 (see data/README.md): ~3.5k SmolLM2
# tokens, long enough that prefill dominates, short enough for a prefill of ~20-40 s on 2 CPU cores.
DOCUMENT_PATH = Path(__file__).resolve().parent.parent / "data" / "metric_system.md"
# Stated once in the document and not guessable from general knowledge, so a right answer shows
# the model read the text. (A question about the Metre Convention's year drew "2019" from the
# 135M model: the text also names 2019 as the Convention's anniversary.)
QUESTION = "Which British firm cast the platinum-iridium alloy for the prototypes?"
EXPECTED_ANSWER = "Johnson Matthey"


def demo_prompt_text(document: str, question: str = QUESTION) -> str:
    """The demo's user turn (see hpipe.model.prompts)."""
    return document_question(document, question)


@dataclass(frozen=True)
class DemoResult:
    document: str
    question: str
    answer: str
    prompt_tokens: int
    prefill_s: float
    prefill_tok_s: float
    decode_tok_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def run_single_process_demo(*, model: str = "smollm2", max_new_tokens: int = 48) -> DemoResult:
    """Prefill the chat prompt in one process and decode greedily."""
    from hpipe.model.generate import generate
    from hpipe.model.source import open_model

    src = open_model(model)
    document = DOCUMENT_PATH.read_text()
    ids = src.tokenizer.encode(src.tokenizer.chat_prompt(demo_prompt_text(document)))
    result = generate(src.load_model(), [ids], max_new_tokens=max_new_tokens,
                      eos_token_ids=src.tokenizer.eos_token_ids)
    return DemoResult(
        document=str(DOCUMENT_PATH.relative_to(DOCUMENT_PATH.parent.parent)), question=QUESTION,
        answer=src.tokenizer.decode(result.output_ids[0]), prompt_tokens=result.prompt_tokens,
        prefill_s=result.prefill_s, prefill_tok_s=result.prefill_tok_s,
        decode_tok_s=result.decode_tok_s)
