import pytest
import torch

from slmkit.infer.generate import load
from slmkit.infer.generate import main as generate


def _step_logits(lm, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the decode step's logits at each position, the forward pass's) for TEXT."""
    ids = torch.tensor([lm.encode(text)])
    cache = lm.model.new_cache(1, ids.shape[1])
    with torch.inference_mode():
        ref = lm.model(ids)[0].float()  # (T, V)
        got = torch.stack([lm.model.step(int(t), cache, i) for i, t in enumerate(ids[0])]).float()
    return got, ref


def test_compiled_decode_matches_the_forward_pass_and_the_eager_loop(tiny_model, capsys):
    from torch._dynamo.utils import counters

    counters.clear()
    lm = load(tiny_model, compile=True)
    assert lm.model.compiled_step is not None
    assert lm.model.layers[0].w_down.weight.is_contiguous()  # rows in memory, not decode_layout's transpose
    got, ref = _step_logits(lm, "ROMEO: But soft, what light")
    assert counters["stats"]["unique_graphs"] >= 3  # attention input, attention output + MLP, head: compiled
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    eager = load(tiny_model)
    assert lm.generate("KING", max_new_tokens=20, temperature=0) == eager.generate("KING", max_new_tokens=20,
                                                                                  temperature=0)
    texts = generate(tiny_model, prompt="KING", max_new_tokens=5, temperature=0, as_json=True, compile=True,
                     device="cpu")  # the verb's path: `slm generate DIR --compile`
    assert texts == [eager.generate("KING", max_new_tokens=5, temperature=0)]


def test_compiled_decode_reads_bf16_weights(tiny_model):
    lm = load(tiny_model, dtype="bf16", compile=True)
    assert lm.model.layers[0].wqkv.weight.dtype == torch.bfloat16
    got, _ = _step_logits(lm, "ROMEO: But soft")
    _, ref = _step_logits(load(tiny_model), "ROMEO: But soft")  # fp32
    # bf16 weights and cache, fp32 residual stream: 0.1% of fp32's logits here (eager bf16, all bf16: 0.4%)
    assert (got - ref).abs().max() < 0.003 * ref.abs().max()


def test_compile_without_a_compiler_is_one_line(tiny_model, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(SystemExit, match="--compile needs a C\\+\\+ compiler"):
        load(tiny_model, compile=True)
