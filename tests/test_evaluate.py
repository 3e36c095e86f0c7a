import math

import pytest

from slmkit.evaluate import bits_per_byte
from slmkit.evaluate import main as evaluate


def test_bits_per_byte_formula():
    assert bits_per_byte(math.log(2), tokens=100, n_bytes=100) == pytest.approx(1.0)
    assert bits_per_byte(math.log(2), tokens=100, n_bytes=400) == pytest.approx(0.25)


def test_eval_matches_training_report(tiny_model, corpus):
    result = evaluate(tiny_model, [str(corpus)], max_tokens=4000)
    assert result["tokens"] > 1000 and result["perplexity"] == pytest.approx(math.exp(result["loss"]))
