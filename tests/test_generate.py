import torch

from slmkit.generate import SamplingParams, generate_ids, load, sample_next, stream_text


def test_greedy_decode_matches_transformers_generate(tiny_model):
    from transformers import AutoModelForCausalLM

    lm = load(tiny_model)
    assert not lm.model.layers[0].w_down.weight.is_contiguous()  # load() puts weights in decode layout
    ids = lm.encode("ROMEO: But soft")
    ours = lm.generate(ids, max_new_tokens=20, temperature=0)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None)
    expected = lm.tokenizer.decode(ref[0, len(ids):], skip_special_tokens=True)
    assert ours == expected[:len(ours)] and len(ours) > 0


def test_same_seed_same_sample(tiny_model):
    lm = load(tiny_model)
    a = lm.generate("KING", max_new_tokens=15, seed=7)
    b = lm.generate("KING", max_new_tokens=15, seed=7)
    assert a == b


def test_sampling_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert sample_next(logits.clone(), SamplingParams(temperature=0)) == 1
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits.clone(), SamplingParams(temperature=1.0, top_k=2), gen=g) for _ in range(50)}
    assert picks == {1, 2}
    picks = {sample_next(logits.clone(), SamplingParams(temperature=1.0, top_k=0, top_p=0.5), gen=g)
             for _ in range(50)}
    assert picks == {1}
    # the penalty makes a seen token lose to the runner-up
    assert sample_next(logits.clone(), SamplingParams(temperature=0, repetition_penalty=2.0),
                       seen=torch.tensor([1])) == 2


class _CharTok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_strings_cut_the_stream_and_are_never_emitted():
    pieces = list(stream_text(_CharTok(), iter(map(ord, "hello END world")), ["END"]))
    assert "".join(pieces) == "hello "
    assert "".join(stream_text(_CharTok(), iter(map(ord, "no stop here")), ["XYZ"])) == "no stop here"


def test_generation_stops_at_the_context_end(tiny_model):
    lm = load(tiny_model)
    ids = list(range(10, 10 + lm.context - 3))
    out = list(generate_ids(lm.model, ids, SamplingParams(max_new_tokens=50, temperature=0), set(), lm.context))
    assert len(out) == 3
