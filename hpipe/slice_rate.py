"""What a prefill slice adds to an item's time, learned while serving (hpipe/session_items.py
measures; the scheduler's slice cap asks).

[Note: slice cost grows with the prefix] A slice of s tokens after p cached ones does, per
layer, about m s + a s (p + s / 2) FLOPs: the matmuls over the layer's weights (m = 2 x its
parameters) and attention over every earlier key (a = 4 x hidden), the analytic cost model's
formula. On SmolLM2 the attention term is twice the matmuls at p = 6000. A cap learned as plain
tokens per second lagged behind that growth, and late slices of a long prompt took several
decode steps (the running streams' longest gap was 4.5x their median).

[Note: two rates, not one] The two kinds of work do not run at one speed on a CPU: a few tokens
attending over thousands of cached keys read the whole cache for little arithmetic, while the
matmuls of the same tokens are one read of the weights. One seconds-per-FLOP rate learned from
a long document's late slices (8 tokens at a 6000-token prefix, 0.9 of a decode step) then
priced a fresh chat's matmuls at the attention's rate and cut 35-token prompts into pieces. So
each kind has its own rate, fitted by least squares over recent slices (exponentially
forgotten). Samples at one size and one prefix cannot tell the two apart, so the fit leans
towards one common rate (a ridge towards it) and takes it whenever the fit gives a rate at or
below zero.
"""

from __future__ import annotations

FORGET = 0.9  # each new slice keeps this much weight of the samples before it
RIDGE = 0.05  # pull towards one common rate, relative to the samples' own weight
COMMON_WEIGHT = 0.2  # the common rate's moving-average weight


class SliceRate:
    def __init__(self, model) -> None:
        self.model = model  # a ModelSpec: its layer_flops is the work
        # The same FLOPs as coefficients: per token of the matmuls, per (token, earlier key)
        # pair of attention (for the root in tokens_within).
        self.matmul, self.attention = 2.0 * model.params_per_layer(), 4.0 * model.hidden
        self.common_s_per_flop: float | None = None  # one rate for both kinds
        self.s_per_flop: tuple[float, float] | None = None  # (matmul, attention) rates
        self._xx = [[0.0, 0.0], [0.0, 0.0]]  # forgotten sums of x x^T and x y, x in FLOPs
        self._xy = [0.0, 0.0]

    @property
    def learned(self) -> bool:
        return self.s_per_flop is not None

    def flops(self, tokens: float, prefix: float) -> tuple[float, float]:
        """(matmul, attention) FLOPs per layer of a slice of ``tokens`` after ``prefix``:
        ``layer_flops`` split into its two terms."""
        matmul = self.matmul * tokens
        return matmul, self.model.layer_flops(batch=1, tokens=tokens, prefix=prefix) - matmul

    def learn(self, tokens: int, prefix: int, seconds: float) -> None:
        """A slice of ``tokens`` after ``prefix`` added ``seconds`` to its item."""
        x = self.flops(tokens, prefix)
        common = seconds / (x[0] + x[1])
        self.common_s_per_flop = (common if self.common_s_per_flop is None else
                                  (1 - COMMON_WEIGHT) * self.common_s_per_flop
                                  + COMMON_WEIGHT * common)
        for i in range(2):
            self._xy[i] = FORGET * self._xy[i] + x[i] * seconds
            for j in range(2):
                self._xx[i][j] = FORGET * self._xx[i][j] + x[i] * x[j]
        # (XX + R) c = Xy + R k: least squares with a ridge R towards the common rate k.
        k = self.common_s_per_flop
        r0, r1 = RIDGE * self._xx[0][0], RIDGE * self._xx[1][1]
        a00, a01, a11 = self._xx[0][0] + r0, self._xx[0][1], self._xx[1][1] + r1
        b0, b1 = self._xy[0] + r0 * k, self._xy[1] + r1 * k
        det = a00 * a11 - a01 * a01
        c = ((b0 * a11 - a01 * b1) / det, (a00 * b1 - a01 * b0) / det) if det > 0 else (k, k)
        self.s_per_flop = c if c[0] > 0 and c[1] > 0 else (k, k)

    def seconds(self, tokens: float, prefix: float) -> float:
        assert self.s_per_flop is not None
        x = self.flops(tokens, prefix)
        return self.s_per_flop[0] * x[0] + self.s_per_flop[1] * x[1]

    def tokens_within(self, seconds: float, prefix: int) -> float:
        """The longest slice at ``prefix`` that takes at most ``seconds``: the positive root of
        (ka a / 2) s^2 + (km m + ka a p) s = seconds."""
        assert self.s_per_flop is not None
        km, ka = self.s_per_flop
        quad, lin = ka * self.attention / 2.0, km * self.matmul + ka * self.attention * prefix
        return 2.0 * seconds / (lin + (lin * lin + 4.0 * quad * seconds) ** 0.5)
