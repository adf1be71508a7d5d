"""The HPipe paper's reported figures (Ma et al., NAACL 2024 Industry, section 4), as data.

Source: algorithms.md section 7 and the seed's experiment notes. Memory is MB per device in the
order P1 P2 P3 P4 R1 R2 (the ``paper`` cluster's order); None = OOM.
"""

from __future__ import annotations

LLAMA_7B = {
    "batch": 6,
    "latency_s": {"base": 20.3, "hpipe": 2.24},
    "throughput_tok_s": {"base": 560.0, "hpipe": 5030.0},
    "memory_mb": {
        "base": (11479, 11479, 11019, 11019, 11461, 11461),
        "hpipe": (1873, 2977, 3143, 1991, 8713, 10087),
    },
}
GPT3_2B = {
    "batch": 12,
    "latency_s": {},
    "throughput_tok_s": {},
    "memory_mb": {
        # "OOM on some devices": the P100s (16 GB) overflow, the 3090s (24 GB) do not.
        "base": (None, None, None, None, "fits", "fits"),
        "hpipe": (4693, 4651, 3153, 295, 3975, 7985),
    },
}
BY_MODEL = {"llama-7b": LLAMA_7B, "gpt3-2.7b": GPT3_2B}

# Headline ratios, over the two models where the paper gives a range.
HPIPE_VS_BASE_LATENCY_X = 9.06  # LLaMA-7B
HPIPE_VS_GPIPE_THROUGHPUT_X = (2.06, 2.28)
HPIPE_VS_GPIPE_LATENCY_REDUCTION = (0.51, 0.56)
HPIPE_VS_TERAPIPE_LATENCY_REDUCTION = (0.331, 0.393)
HPIPE_DYNAMIC_ENERGY_REDUCTION = 0.682  # "68.2% less than the other methods" (LLaMA-7B)
