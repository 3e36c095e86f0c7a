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


@pytest.mark.parametrize("flag", ["block_size", "batch_size", "max_tokens"])
def test_window_sizes_below_one_are_refused(tiny_model, corpus, flag):
    """--batch-size 0 crashed in range(); --block-size 0 quietly meant the model's context."""
    with pytest.raises(SystemExit, match=f"^error: --{flag.replace('_', '-')} 0 must be positive"):
        evaluate(tiny_model, data=[str(corpus)], **{flag: 0})
