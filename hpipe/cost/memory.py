"""Memory model of a pipeline stage [design, algorithms.md section 2].

    stage memory = runtime context + weights of its layers (+ embedding / head)
                 + KV cache for batch x seq_len tokens of its layers
                 + the largest unit's workspace (one layer's activations at a time)

[Note: attention workspace] Two kernels, two costs:
- "eager" (HF transformers' eager attention, what the paper's systems ran): scores in the model
  dtype, softmax in float32, probabilities cast back, so each element of the (rows, heads, s,
  p + s) score tensor costs 2 * elem + 4 bytes while the layer runs. Token slicing keeps that
  at s * (p + s) instead of L^2: the reason Base runs out of memory where HPipe does not. The
  paper's experiment (hpipe/experiment.py) models this kernel.
- "sdpa" (what hpipe's runtime runs, hpipe/model/decoder.py, on CPU and CUDA): fused kernels
  that never hold the score tensor. A slice after a prefix passes an explicit (s, p + s)
  boolean mask, one per layer call and shared by every row and head, which SDPA turns into an
  additive float mask: about 5 bytes per (query, key) pair. Measured on this CPU (torch 2.13,
  9 heads, GQA): SDPA's own peak grew 17 MiB for s = 512, p = 8192, where the scores would be
  153 MiB; 56 MiB for s = 2048, p = 6000 (566 MiB of scores). A slice at prefix 0 and a decode
  step need no mask.
"""

from __future__ import annotations

from hpipe.cluster import DeviceSpec
from hpipe.spec import ModelSpec

MIB = 1024**2
ATTENTION_KERNELS = ("sdpa", "eager")
# SDPA's mask per (query, key) pair: our bool mask (1 byte) and SDPA's float copy of it (4).
SDPA_MASK_BYTES_PER_PAIR = 5

# CUDA context + PyTorch allocator slack + cuBLAS workspace, as nvidia-smi shows for a process
# that has run one matmul (~300-500 MiB on Pascal/Ampere). A CPU worker pays the interpreter
# and the torch import instead: with it, predicted peaks of SmolLM2 prefills of 512-4096
# tokens came within 8% of the measured peak RSS here (tests/test_memory_model.py; the
# loader's own transient peak, higher, is over before the first request). The same probe's
# peaks differ by about 90 MiB between two venvs of one machine (821/955/960 MiB against
# 897/1061/1058 MiB for 512/2048/3072 tokens), so the figure sits between them. It was 256 MiB
# while loading an embedding imported torch._dynamo (see decoder.Embedding).
CONTEXT_BYTES_GPU = 512 * MIB
CONTEXT_BYTES_CPU = 224 * MIB


def context_bytes(device: DeviceSpec) -> int:
    return CONTEXT_BYTES_CPU if device.kind == "cpu" else CONTEXT_BYTES_GPU


def weight_bytes(model: ModelSpec, *, num_layers: int, has_embedding: bool, has_head: bool,
                 elem_bytes: int) -> int:
    """Weights held by a stage. Each stage keeps its own head copy even when tied."""
    params = num_layers * model.params_per_layer()
    params += model.embedding_params() if has_embedding else 0
    params += model.head_params() if has_head else 0
    return params * elem_bytes


def kv_bytes(model: ModelSpec, *, num_layers: int, batch: int, seq_len: int,
             elem_bytes: int) -> int:
    """K and V for ``batch`` rows of ``seq_len`` tokens on ``num_layers`` layers."""
    return num_layers * batch * seq_len * model.kv_bytes_per_token_per_layer(elem_bytes)


def workspace_bytes(model: ModelSpec, *, rows: int, tokens: int, prefix: int, elem_bytes: int,
                    tp: int = 1, has_head: bool = False, attention: str = "sdpa") -> int:
    """Peak transient memory while one layer runs on a unit of rows x tokens at ``prefix``.

    Layers run one at a time, so only one layer's temporaries are live. A tensor-parallel
    group of ``tp`` devices splits heads and the MLP width; hidden states are replicated.
    """
    n = rows * tokens
    hidden = 4 * n * model.hidden * elem_bytes  # residual, normed input, block output, send buffer
    qkv = n * (model.hidden + 2 * model.kv_dim) * elem_bytes // tp
    if attention == "eager":
        scores = rows * model.num_heads * tokens * (prefix + tokens) * (2 * elem_bytes + 4) // tp
    else:  # see [Note: attention workspace]: the mask, and the attention output
        assert attention == "sdpa", attention
        mask = tokens * (prefix + tokens) * SDPA_MASK_BYTES_PER_PAIR if prefix and tokens > 1 else 0
        scores = mask + n * model.hidden * elem_bytes // tp
    mlp_width = 3 if model.family == "llama" else 2  # SwiGLU: gate, up, product; GELU: fc, act
    mlp = n * model.intermediate * mlp_width * elem_bytes // tp
    # The head computes float32 logits for each row's last token only (the next-token
    # distribution); a prefill that only analyses content never needs the others.
    logits = rows * model.vocab_size * 4 // tp if has_head else 0
    return hidden + max(qkv + scores, mlp, logits)


def decode_read_bytes(model: ModelSpec, *, batch: int, context: int, elem_bytes: int) -> int:
    """What one decode step reads: every layer's weights and the head once, and each row's KV
    cache of ``context`` tokens (gpt-fast's "achieved bandwidth" numerator)."""
    weights = model.num_layers * model.params_per_layer() + model.head_params()
    return weights * elem_bytes + kv_bytes(model, num_layers=model.num_layers, batch=batch,
                                           seq_len=context, elem_bytes=elem_bytes)


def achieved_gb_s(model: ModelSpec, *, batch: int, prompt_tokens: int, steps: int,
                  decode_s: float, elem_bytes: int) -> float:
    """GB/s a decode of ``steps`` steps after ``prompt_tokens`` reached: the bytes its steps
    read (at their mean context) over the time they took; 0 without decode."""
    if steps <= 0 or decode_s <= 0:
        return 0.0
    per_step = decode_read_bytes(model, batch=batch, context=prompt_tokens + steps // 2,
                                 elem_bytes=elem_bytes)
    return per_step * steps / decode_s / 1e9


def kv_token_budget(plan, *, workspace_tokens: int = 512) -> int:
    """KV-cache positions every stage of ``plan`` can hold beside its weights: the least, over
    stages, of (device memory - context - weights - a workspace for ``workspace_tokens``
    tokens) / KV bytes per position of the stage's layers. A server admits requests while the
    prompt and new tokens of all of them fit (hpipe.interleave)."""
    from hpipe.spec import dtype_bytes

    elem = dtype_bytes(plan.dtype)
    model = plan.model
    last = plan.num_stages - 1
    budget = None
    for s, st in enumerate(plan.stages):
        tp = len(st.devices)
        dev = plan.cluster.devices[st.devices[0]]
        weights = weight_bytes(model, num_layers=st.num_layers, has_embedding=s == 0,
                               has_head=s == last, elem_bytes=elem) // tp
        work = workspace_bytes(model, rows=1, tokens=workspace_tokens, prefix=0,
                               elem_bytes=elem, tp=tp, has_head=s == last)
        free = dev.memory_bytes - context_bytes(dev) - weights - work
        per_token = max(1, kv_bytes(model, num_layers=st.num_layers, batch=1, seq_len=1,
                                    elem_bytes=elem) // tp)
        tokens = max(0, int(free // per_token)) if st.num_layers else 1 << 40
        budget = tokens if budget is None else min(budget, tokens)
    return int(budget or 0)
