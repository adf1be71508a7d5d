"""Prefill speed: our decoder vs transformers, same model (SmolLM2-135M GGUF), same threads.

Both load the same GGUF dequantized to float32 (ours through hpipe.model, transformers through
its own GGUF reader into its LlamaForCausalLM). Each runs a full forward over the same prompt of
``--tokens`` ids, full logits on both sides (transformers computes all positions' logits by
default; so do we when called without last_only), best of ``--repeats`` after a warm-up.

    .venv/bin/python benchmarks/model_speed.py [--tokens 2048] [--threads N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch


def load_transformers(gguf_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # from_pretrained(gguf_file=...) insists on `accelerate`; the same reader, called directly.
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(state, strict=False)  # lm_head is tied to embed_tokens
    model.tie_weights()
    return model.eval()


def best_times_s(fns, repeats: int) -> list[float]:
    """Best wall time of each fn, run alternately so that load from other processes on a shared
    machine hits both sides alike (running one side's repeats first biased the ratio by ~2x)."""
    for fn in fns:
        fn()  # warm-up: first calls pay allocator and kernel selection
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hpipe.model.source import find_smollm2_gguf, open_model

    path = find_smollm2_gguf()
    src = open_model(path)
    ours = src.load_model()
    theirs = load_transformers(path)
    ids = torch.randint(3, src.spec.vocab_size, (1, args.tokens),
                        generator=torch.Generator().manual_seed(0))

    with torch.inference_mode():
        def run_ours():
            return ours(ids, ours.new_cache(batch=1, max_tokens=args.tokens))

        def run_theirs():
            return theirs(ids, use_cache=False).logits

        max_diff = (run_ours() - run_theirs()).abs().max().item()
        ours_s, theirs_s = best_times_s([run_ours, run_theirs], args.repeats)

    ours_tok_s, theirs_tok_s = args.tokens / ours_s, args.tokens / theirs_s
    print(f"SmolLM2-135M float32, prefill {args.tokens} tokens, {args.threads} threads, "
          f"best of {args.repeats}")
    print(f"  hpipe        {ours_tok_s:8.1f} tok/s  ({ours_s:.3f} s)")
    print(f"  transformers {theirs_tok_s:8.1f} tok/s  ({theirs_s:.3f} s)")
    print(f"  ratio hpipe / transformers = {ours_tok_s / theirs_tok_s:.2f}x "
          f"(goal >= 0.90x); max |logit diff| = {max_diff:.2e}")


if __name__ == "__main__":
    main()
