"""Random and mutated input files against the loaders and the CLI: a typed error or success,
never a traceback, never a hang.

Each input kind starts from a valid file and is mutated two ways: as bytes (cut short, a span
deleted, bytes flipped or inserted: what a truncated copy or a wrong file gives) and as
structure (a value anywhere in the document replaced by another JSON value, a key removed:
what a hand edit gives, and what reaches the deep validation code).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from profile_harness import make_profile

from hpipe.cli import main
from hpipe.cluster import load_cluster, local_cluster
from hpipe.cost.profile_file import read_profile
from hpipe.errors import HPipeError, PlanMismatchError
from hpipe.plan.api import plan_method
from hpipe.plan.plan import read_plan
from hpipe.spec import model_preset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=8)


def _paths(doc, prefix=()):
    """Every (container, key) path in a JSON-like document."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def structural_mutants(draw, doc):
    """``doc`` with one value replaced (or a key dropped) somewhere."""
    doc = copy.deepcopy(doc)
    paths = _paths(doc)
    path = draw(st.sampled_from(paths[1:]))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return doc


@st.composite
def byte_mutants(draw, data: bytes):
    """``data`` cut, with a span deleted, or with random bytes written or inserted."""
    how = draw(st.sampled_from(["cut", "delete", "overwrite", "insert", "random"]))
    if how == "random":
        return draw(st.binary(max_size=200))
    i = draw(st.integers(0, len(data)))
    if how == "cut":
        return data[:i]
    j = draw(st.integers(i, min(len(data), i + 40)))
    if how == "delete":
        return data[:i] + data[j:]
    junk = draw(st.binary(min_size=1, max_size=8))
    return data[:i] + junk + (data[i + len(junk):] if how == "overwrite" else data[i:])


def _only_typed_errors(load, path: Path) -> None:
    try:
        load(path)
    except HPipeError:
        pass  # a typed error, naming the file: what a user should see


# -- cluster files -----------------------------------------------------------------------------
CLUSTER_TEXT = (EXAMPLES / "hetero3_1gbit.yaml").read_bytes()
CLUSTER_DOC = yaml.safe_load(CLUSTER_TEXT)


@FUZZ
@given(data=byte_mutants(CLUSTER_TEXT))
def test_cluster_files_cut_or_garbled(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("c") / "cluster.yaml"
    path.write_bytes(data)
    _only_typed_errors(lambda p: load_cluster(str(p)), path)


@FUZZ
@given(doc=structural_mutants(CLUSTER_DOC))
def test_cluster_files_hand_edited(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("c") / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc))
    _only_typed_errors(lambda p: load_cluster(str(p)), path)


# -- plan files --------------------------------------------------------------------------------
PLAN = plan_method("hpipe", model=model_preset("smollm2-135m"), cluster=local_cluster(2),
                   batch=1, seq_len=256, dtype="float32")
PLAN_DOC = json.loads(PLAN.to_json())


@FUZZ
@given(data=byte_mutants(PLAN.to_json().encode()))
def test_plan_files_cut_or_garbled(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("p") / "plan.json"
    path.write_bytes(data)
    _only_typed_errors(read_plan, path)


@FUZZ
@given(doc=structural_mutants(PLAN_DOC))
def test_plan_files_hand_edited(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("p") / "plan.json"
    path.write_text(json.dumps(doc))
    _only_typed_errors(read_plan, path)


# -- profile files -----------------------------------------------------------------------------
def test_the_profile_seed_reads_back(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(make_profile().to_json())
    assert read_profile(path) == make_profile()


@FUZZ
@given(data=st.data())
def test_profile_files_cut_garbled_or_hand_edited(tmp_path_factory, data):
    text = make_profile().to_json()
    if data.draw(st.booleans()):
        raw = data.draw(byte_mutants(text.encode()))
    else:
        raw = json.dumps(data.draw(structural_mutants(json.loads(text)))).encode()
    path = tmp_path_factory.mktemp("f") / "profile.json"
    path.write_bytes(raw)
    _only_typed_errors(read_profile, path)


# -- the CLI -----------------------------------------------------------------------------------
def _tiny_plan_doc(tiny_checkpoints) -> dict:
    from hpipe.model.source import open_model

    spec = open_model(tiny_checkpoints["llama"]).spec
    return json.loads(plan_method("hpipe", model=spec, cluster=local_cluster(2), batch=1,
                                  seq_len=4, dtype="float32").to_json())


@pytest.fixture
def no_launch(monkeypatch):
    """A plan that passes every check would start workers: stop there, as a typed error."""
    def refuse(*_a, **_k):
        raise PlanMismatchError("(test) every check passed; a session would start here")

    monkeypatch.setattr("hpipe.session.Session.open", refuse)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_cli_answers_any_cluster_or_plan_file_with_one_line(tmp_path_factory, capsys, data,
                                                                tiny_checkpoints, no_launch):
    """``hpipe plan --cluster FILE`` and ``hpipe run --plan FILE`` (checked up to the launch):
    exit 0 or 2, and never a traceback."""
    folder = tmp_path_factory.mktemp("cli")
    if data.draw(st.booleans()):
        path = folder / "cluster.yaml"
        path.write_bytes(data.draw(byte_mutants(CLUSTER_TEXT))
                         if data.draw(st.booleans())
                         else yaml.safe_dump(data.draw(structural_mutants(CLUSTER_DOC))).encode())
        # Base plans in milliseconds: the loader and the CLI are under test, not the search.
        argv = ["plan", "--cluster", str(path), "--model", "smollm2-135m", "--seq-len", "64",
                "--batch", "1", "--method", "base", "--json"]
    else:
        path = folder / "plan.json"
        path.write_text(json.dumps(data.draw(structural_mutants(_tiny_plan_doc(tiny_checkpoints)))))
        argv = ["run", "--model", str(tiny_checkpoints["llama"]), "--plan", str(path),
                "--prompt-ids", "5,6,7,8", "--max-new-tokens", "2", "--json"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        assert err.count("\n") == 1 and re.match(r"hpipe (plan|run): error: ", err), err
        assert set(json.loads(out.strip().splitlines()[-1])) == {"error"}
