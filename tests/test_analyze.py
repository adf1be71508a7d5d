"""``hpipe analyze``: inputs checked before any work, answers written once per pair and resumed
after a kill, too-long and unreadable documents recorded, answers equal to a single process
(with the document's KV reused for its later questions), and the same job through
``hpipe serve``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_harness import all_gone, children_of
from serve_harness import KEY, Server

from hpipe.analyze.answers import AnswerFile, record
from hpipe.analyze.inputs import html_to_text, read_inputs, read_questions
from hpipe.errors import InputFileError

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ("Who is the text about?", "Name one place in the text.")
MAX_NEW = "12"


def hpipe(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpipe.cli", *argv], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def answers_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def document_text():
    from hpipe.demo import DOCUMENT_PATH

    return DOCUMENT_PATH.read_text()


@pytest.fixture
def docs(tmp_path, document_text) -> Path:
    """Two short documents, one too long for SmolLM2's 8k context, one not UTF-8, one PDF."""
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(document_text[:1800])
    (folder / "sub" / "b.md").write_text(document_text[4000:5800])
    (folder / "long.txt").write_text(document_text * 3)  # about 10.6k tokens
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (folder / "scan.pdf").write_bytes(b"%PDF-1.4")
    return folder


# -- inputs, before any work --------------------------------------------------------------------
def test_a_folder_reads_text_files_and_lists_the_rest(docs):
    inputs = read_inputs(docs)
    assert [d.id for d in inputs.documents] == ["a.txt", "latin1.txt", "long.txt", "sub/b.md"]
    assert inputs.skipped == ("scan.pdf",)
    bad = inputs.documents[1]
    assert bad.text is None and "not UTF-8" in bad.error


def test_html_is_read_as_its_text():
    page = ("<html><head><title>t</title><style>p{}</style></head><body><h1>Deed</h1>"
            "<p>Signed by <b>Ann</b> &amp; Bob.</p><script>x()</script></body></html>")
    assert html_to_text(page) == "Deed\nSigned by Ann & Bob."


@pytest.mark.parametrize(("lines", "match"), [
    (['{"id": "a", "text": "x"}', '{"id": "b" "text": "y"}'], r"line 2 is not JSON"),
    (['{"id": "a", "text": "x"}', '', '["a", "b"]'], r"line 3 is a JSON list"),
    (['{"id": "a"}'], r'line 1: "text" must be a non-empty string'),
    (['{"id": true, "text": "x"}'], r'line 1: "id" must be'),
    (['{"id": 1, "text": "x"}', '{"id": "1", "text": "y"}'], r"line 2: id '1' was already used on "
                                                             r"line 1"),
    (['{"id": "a", "text": "x", "questions": []}'], r'line 1: "questions" must be a non-empty'),
    (['{"id": "a", "text": "x", "answer": "y"}'], r"line 1 has unknown field\(s\) answer"),
    ([''], r"holds no documents"),
])
def test_a_bad_jsonl_line_is_named(tmp_path, lines, match):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputFileError, match=match):
        read_inputs(path)


def test_questions_come_from_flags_and_a_file(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("# asked of every contract\nWho signed it?\n\nWhen does it end?\nWho signed it?\n")
    assert read_questions(["What is it?"], path) == ("What is it?", "Who signed it?",
                                                      "When does it end?")
    path.write_text("# nothing\n\n")
    with pytest.raises(InputFileError, match="holds no questions"):
        read_questions(None, path)


def test_the_cli_refuses_bad_input_before_starting_anything(tmp_path, docs):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.pdf").write_bytes(b"%PDF")
    out = tmp_path / "answers.jsonl"
    cases = [
        ([str(empty), "--question", "q", "--model", "smollm2"],
         r"has no \.txt, \.md, \.html, \.htm files \(it holds 1 other files: notes\.pdf\)"),
        ([str(docs), "--model", "smollm2"], r"give --question \(repeatable\) or --questions"),
        ([str(docs), "--question", "q"], r"give --model .* or --server URL"),
        ([str(docs), "--question", "q", "--server", "http://127.0.0.1:9", "--cluster",
          "local:2"], r"--cluster describe a pipeline in this process"),
        ([str(docs), "--question", "q", "--model", "smollm2", "--max-new-tokens", "0"],
         r"--max-new-tokens"),
        ([str(docs), "--question", "q", "--server", "http://127.0.0.1:9"],
         r"--server http://127.0.0.1:9/v1: cannot reach it"),
    ]
    for argv, match in cases:
        r = hpipe("analyze", *argv, "--out", str(out), timeout=60)
        assert r.returncode == 2, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert __import__("re").search(match, r.stderr), (match, r.stderr)
    assert not out.exists() or out.read_text() == ""


def test_a_cut_last_line_is_dropped_and_a_foreign_file_refused(tmp_path):
    path = tmp_path / "answers.jsonl"
    whole = json.dumps(record("a", "q1", status="ok", answer="yes")) + "\n"
    path.write_text(whole + whole.replace("q1", "q2")[:30])  # killed mid-write
    f = AnswerFile.open(path)
    assert f.dropped_partial and set(f.done) == {("a", "q1")}
    f.write(record("a", "q2", status="ok", answer="no"))
    f.close()
    assert [r["question"] for r in answers_of(path)] == ["q1", "q2"]
    path.write_text("not an answer\n" + whole)
    with pytest.raises(InputFileError, match=r"line 1 is not an answer record.*--overwrite"):
        AnswerFile.open(path)


# -- the job on SmolLM2, local:2 ----------------------------------------------------------------
def _solo(smollm2, smollm2_model, text: str, question: str) -> str:
    from hpipe.model.generate import generate
    from hpipe.model.prompts import document_question

    tok = smollm2.tokenizer
    ids = tok.encode(tok.chat_messages([{"role": "user",
                                         "content": document_question(text, question)}]))
    out = generate(smollm2_model, [ids], max_new_tokens=int(MAX_NEW),
                   eos_token_ids=tok.eos_token_ids)
    return tok.decode(out.output_ids[0]).strip()


def test_a_folder_job_answers_every_pair_once(tmp_path, docs, smollm2, smollm2_model):
    qfile = tmp_path / "questions.txt"
    qfile.write_text("\n".join(QUESTIONS) + "\n")
    out = tmp_path / "answers.jsonl"
    argv = ["analyze", str(docs), "--questions", str(qfile), "--out", str(out), "--model",
            "smollm2", "--cluster", "local:2", "--no-tp", "--max-new-tokens", MAX_NEW, "--json"]
    r = hpipe(*argv)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert "skipped 1 files that are not text: scan.pdf" in r.stderr
    rows = {(a["id"], a["question"]): a for a in answers_of(out)}
    assert len(rows) == len(answers_of(out)) == 8
    assert summary["answered"] == 4 and summary["too_long"] == 2 and summary["errors"] == 2
    for q in QUESTIONS:
        assert rows[("latin1.txt", q)]["status"] == "error"
        assert "not UTF-8" in rows[("latin1.txt", q)]["error"]
        long = rows[("long.txt", q)]
        assert long["status"] == "too_long"
        assert __import__("re").search(r"the prompt has \d{5} tokens .* context of 8192",
                                       long["error"])
    text = {"a.txt": (docs / "a.txt").read_text(), "sub/b.md": (docs / "sub" / "b.md").read_text()}
    for doc_id, body in text.items():
        first, second = (rows[(doc_id, q)] for q in QUESTIONS)
        for q, row in zip(QUESTIONS, (first, second)):
            assert row["status"] == "ok" and row["answer"] == _solo(smollm2, smollm2_model,
                                                                    body, q), row
            assert row["prompt_tokens"] > 400 and row["prefill_s"] > 0 and row["decode_s"] >= 0
        # The second question reused the document: it prefilled about its own tokens.
        assert first["cached_tokens"] < 64 < first["prompt_tokens"] - 300 < second["cached_tokens"]
    rerun = hpipe(*argv)
    assert rerun.returncode == 0 and json.loads(rerun.stdout)["held"] == 8
    assert "holds 8 answers; resuming" in rerun.stderr and "starting" not in rerun.stderr
    assert len(answers_of(out)) == 8


def test_a_killed_job_resumes_without_losing_or_repeating_a_pair(tmp_path, document_text):
    docs = tmp_path / "many.jsonl"
    with docs.open("w") as f:
        for i in range(5):
            f.write(json.dumps({"id": f"d{i}", "text": document_text[600 * i:600 * i + 1200]})
                    + "\n")
    out = tmp_path / "answers.jsonl"
    argv = [sys.executable, "-m", "hpipe.cli", "analyze", str(docs), "--question", QUESTIONS[0],
            "--question", QUESTIONS[1], "--out", str(out), "--model", "smollm2", "--cluster",
            "local:2", "--no-tp", "--max-new-tokens", MAX_NEW, "--in-flight", "1"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not out.exists() or len(answers_of(out)) < 3):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    workers = children_of(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    held = len(answers_of(out))
    assert 3 <= held < 10
    assert all_gone(workers, 15)  # the workers follow their parent (PR_SET_PDEATHSIG)
    r = subprocess.run(argv + ["--json"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["held"] == held
    pairs = [(a["id"], a["question"]) for a in answers_of(out)]
    assert sorted(pairs) == sorted((f"d{i}", q) for i in range(5) for q in QUESTIONS)
    assert all(a["status"] == "ok" for a in answers_of(out))


def test_ctrl_c_stops_with_a_file_a_rerun_resumes(tmp_path, document_text):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"{i}.txt").write_text(document_text[500 * i:500 * i + 1200])
    out = tmp_path / "answers.jsonl"
    argv = [sys.executable, "-m", "hpipe.cli", "analyze", str(docs), "--question", QUESTIONS[0],
            "--out", str(out), "--model", "smollm2", "--cluster", "local:2", "--no-tp",
            "--max-new-tokens", "24", "--in-flight", "1"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                        signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not out.exists() or not answers_of(out)):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    workers = children_of(proc.pid)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    assert all_gone(workers), "a worker outlived analyze"
    held = answers_of(out)  # every line whole
    assert 1 <= len(held) < 3
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert sorted(a["id"] for a in answers_of(out)) == [f"{i}.txt" for i in range(3)]


def test_the_same_job_through_hpipe_serve(tmp_path, docs, smollm2, smollm2_model):
    jsonl = tmp_path / "docs.jsonl"
    body = (docs / "a.txt").read_text()
    jsonl.write_text(json.dumps({"id": "a", "text": body, "questions": list(QUESTIONS)}) + "\n")
    out = tmp_path / "answers.jsonl"
    server = Server(["--model", "smollm2", "--cluster", "local:2", "--no-tp", "--seq-len",
                     "512"], api_key=KEY)
    try:
        server.wait_ready()
        r = hpipe("analyze", str(jsonl), "--out", str(out), "--server", server.url,
                  "--api-key", KEY, "--max-new-tokens", MAX_NEW, "--json")
        assert r.returncode == 0, r.stderr
        wrong_key = hpipe("analyze", str(jsonl), "--out", str(tmp_path / "x.jsonl"),
                          "--server", server.url, "--api-key", "nope")
        assert wrong_key.returncode == 2 and "refused the API key" in wrong_key.stderr
    finally:
        server.stop()
    rows = {a["question"]: a for a in answers_of(out)}
    for q in QUESTIONS:
        assert rows[q]["status"] == "ok"
        assert rows[q]["answer"] == _solo(smollm2, smollm2_model, body, q)
    assert rows[QUESTIONS[1]]["cached_tokens"] > rows[QUESTIONS[1]]["prompt_tokens"] - 40


# -- fuzz: whatever a JSONL input holds, a document list or one typed error ---------------------
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.sampled_from(["id", "text", "questions", "x"]), inner,
                                       max_size=4), max_leaves=8)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(lines=st.lists(st.one_of(_JSON.map(json.dumps), st.text(max_size=30)), max_size=5))
def test_any_jsonl_gives_documents_or_an_error_naming_the_input(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "docs.jsonl"
    path.write_text("\n".join(lines))
    try:
        inputs = read_inputs(path)
    except InputFileError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    for doc in inputs.documents:
        assert doc.id and doc.text.strip()
        assert doc.questions is None or all(q for q in doc.questions)
