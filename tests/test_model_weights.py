"""A stage reads only its own tensors, from safetensors shards and from GGUF."""

import json

import pytest
import torch

from hpipe.model.source import open_model
from hpipe.model.weights import unpermute_qk

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _layers_in(names):
    return {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}


def test_safetensors_stage_reads_only_its_layers_and_shards(tiny_checkpoints):
    path = tiny_checkpoints["llama_sharded"]
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 3, "fixture should spread the weights over many shards"
    src = open_model(path)
    src.load_stage(1, 3, has_embedding=False, has_head=False)
    read = src.reader.names_read
    want = sorted(n for n in index if n.startswith(("model.layers.1.", "model.layers.2.")))
    assert sorted(read) == want  # each tensor of layers 1 and 2 once, nothing else
    assert {p.name for p in src.reader.shards_opened} == {index[n] for n in want}


def test_safetensors_first_and_last_stage_add_embedding_and_head(tiny_checkpoints):
    src = open_model(tiny_checkpoints["llama_sharded"])  # tied: the head *is* the embedding
    src.load_stage(0, 1, has_embedding=True, has_head=False)
    assert _layers_in(src.reader.names_read) == {0}
    assert "model.embed_tokens.weight" in src.reader.names_read
    assert "model.norm.weight" not in src.reader.names_read
    src.reader.names_read.clear()
    last = src.load_stage(3, 4, has_embedding=False, has_head=True)
    assert _layers_in(src.reader.names_read) == {3}
    assert {"model.norm.weight", "model.embed_tokens.weight"} <= set(src.reader.names_read)
    assert last.embed is None and last.head is not None


def test_whole_model_reads_tied_embedding_once(tiny_checkpoints):
    src = open_model(tiny_checkpoints["llama"])
    model = src.load_model()
    assert src.reader.names_read.count("model.embed_tokens.weight") == 1
    assert model.head.weight is model.embed.tok.weight


def test_gguf_stage_reads_only_its_tensors(smollm2):
    src = smollm2
    src.reader.names_read.clear()
    stage = src.load_stage(5, 8, has_embedding=False, has_head=False)
    read = src.reader.names_read
    assert {n.split(".")[1] for n in read} == {"5", "6", "7"}
    assert len(read) == 3 * 9  # 9 tensors per block: 2 norms, q, k, v, o, gate, up, down
    assert list(stage.layers) == ["5", "6", "7"]  # global layer keys


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py, LlamaModel.permute
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def test_unpermute_inverts_llama_cpp_permute():
    w = torch.randn(3 * 64, 40)  # 3 heads of dim 64
    assert torch.equal(unpermute_qk(_llama_cpp_permute(w, 3), 3), w)
    b = torch.randn(3 * 64)
    assert torch.equal(unpermute_qk(_llama_cpp_permute(b, 3), 3), b)
