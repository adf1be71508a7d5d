"""Model presets carry the real shapes: their parameter counts match the model cards, and the
long-context ones plan at their full context."""

import pytest

from hpipe.spec import model_preset

# Parameters as the model cards state them (billions).
CARDS = {"llama-3.1-8b": 8.03, "llama-3.1-70b": 70.6, "llama-3.1-405b": 405.9,
         "qwen2.5-7b": 7.61, "qwen2.5-32b": 32.5, "qwen2.5-72b": 72.7, "mistral-7b": 7.25,
         "llama-7b": 6.74, "llama-70b": 69.0}


@pytest.mark.parametrize("name", sorted(CARDS))
def test_parameter_counts_match_the_model_cards(name):
    assert model_preset(name).total_params() / 1e9 == pytest.approx(CARDS[name], rel=0.01)


def test_long_context_presets():
    assert model_preset("llama-3.1-405b").num_layers == 126
    assert model_preset("llama-3.1-70b").max_seq_len == 131072
    assert model_preset("qwen2.5-72b").max_seq_len == 32768
