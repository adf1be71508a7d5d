"""``hpipe analyze``: the same questions over a folder of long documents, answers in a JSONL
file that survives a crash.

inputs.py reads the documents and questions (every error before any work), answers.py is the
output file (resume, flush per answer), backends.py asks a question through a Session or an
OpenAI-compatible server, job.py keeps several documents in flight and reports progress.
"""
