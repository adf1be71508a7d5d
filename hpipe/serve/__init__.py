"""``hpipe serve``: the pipeline as an OpenAI-compatible HTTP endpoint (see app.py, engine.py)."""
