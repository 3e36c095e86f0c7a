import pytest
import torch

from slmkit.infer.generate import generate_ids, load, stream_text
from slmkit.infer.sampling import NonFiniteLogits, SamplingParams, draw, sample_next


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


def test_decoding_records_no_autograd(tiny_model):
    # generate_ids lost its inference_mode once (a function was inserted under its decorator): every step then built
    # an autograd graph over the parameters, 5 ms a token at 135M
    lm = load(tiny_model)
    modes = []
    real_step = lm.model.step
    lm.model.step = lambda *a: (modes.append(torch.is_inference_mode_enabled()), real_step(*a))[1]
    out = list(generate_ids(lm.model, lm.encode("KING"), SamplingParams(max_new_tokens=4, temperature=0), set(),
                            lm.context))
    assert len(out) == 4 and len(modes) >= 3 and all(modes)


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


@pytest.mark.parametrize("params", [dict(temperature=0), dict(temperature=1.0, top_k=2),
                                    dict(temperature=1.0, top_k=0, top_p=0.9), dict(temperature=1.0, top_k=0)])
def test_nan_scores_are_refused_on_every_sampling_path(params):
    logits = torch.tensor([1.0, float("nan"), 2.0, 0.5])
    with pytest.raises(NonFiniteLogits, match="NaN or infinite"):
        sample_next(logits, SamplingParams(**params))


@pytest.mark.parametrize("setting, message", [
    (dict(top_k=-5), "--top-k -5 must be 0"),
    (dict(repetition_penalty=0.0), "--repetition-penalty 0.0 must be positive"),
    (dict(temperature=float("nan")), "--temperature nan must be"), (dict(top_p=0.0), "--top-p 0.0 must be in"),
    (dict(max_new_tokens=-1), "--max-new-tokens -1 must be")])
def test_settings_that_cannot_sample_are_named_before_loading(setting, message, tmp_path):
    """top_k < 0 crashed inside topk; a zero penalty or a NaN temperature made NaN scores, taken for NaN weights."""
    from slmkit.infer.generate import main as generate

    with pytest.raises(ValueError, match=message):
        SamplingParams(**setting)
    with pytest.raises(SystemExit, match="^error: " + message):  # before the folder is read: it does not exist
        generate(tmp_path / "no-model", prompt="x", **setting)


def test_generate_names_a_diverged_model_in_one_line(tiny_model, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from slmkit.infer.generate import main as generate

    broken = tmp_path / "diverged"
    shutil.copytree(tiny_model, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"][3] = float("nan")  # what a diverged run leaves behind
    save_file(weights, broken / "model.safetensors")
    for temperature in (0.0, 0.8):
        with pytest.raises(SystemExit, match=r"^error: .*model.norm.weight holds NaN.*diverged") as e:
            generate(broken, prompt="KING", max_new_tokens=5, temperature=temperature)
        assert "\n" not in e.value.code


def test_draw_follows_the_weights_and_never_picks_a_zero():
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0])  # unnormalised
    picks = [draw(w, g) for _ in range(4000)]
    assert set(picks) == {1, 3}
    assert abs(picks.count(3) / 4000 - 0.75) < 0.03
    with pytest.raises(ValueError, match="cannot sample"):
        draw(torch.tensor([float("nan"), 1.0]), g)


def test_top_p_alone_keeps_the_smallest_set_reaching_it():
    # Without top-k the nucleus is looked for among the best 256 tokens first, over all V when they fall short: a
    # peaked distribution takes the first path, a flat one (the best 256 of 1000 hold ~30%) the second.
    g = torch.Generator().manual_seed(0)
    for scale, first_256_reach_it in ((2.0, True), (0.1, False)):
        logits = torch.randn(1000, generator=g) * scale
        probs, order = torch.sort(torch.softmax(logits, -1), descending=True)
        assert (float(probs[:256].sum()) > 0.5) == first_256_reach_it
        nucleus = set(order[: int((probs.cumsum(0) < 0.5).sum()) + 1].tolist())
        picks = {sample_next(logits.clone(), SamplingParams(temperature=1.0, top_k=0, top_p=0.5), gen=g)
                 for _ in range(300)}
        assert picks <= nucleus  # nothing outside the top-p set ...
        assert len(picks) > (2 if first_256_reach_it else 50)  # ... and more than its best token


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


@pytest.mark.parametrize("verb, setting, message", [
    ("generate", dict(threads=-1), "--threads -1 must be positive"),  # crashed in torch.set_num_threads
    ("generate", dict(threads=0), "--threads 0 must be positive"),  # quietly meant all cores
    ("generate", dict(num_samples=0), "--num-samples 0 must be positive"),
    ("chat", dict(threads=-2), "--threads -2 must be positive"),
    # --draft-tokens sizes a --draft's guesses: without a draft it was dropped without a word
    ("generate", dict(draft_tokens=4), "--draft-tokens does not apply without --draft"),
    ("chat", dict(draft_tokens=4), "--draft-tokens does not apply without --draft")])
def test_cli_numbers_are_named_before_loading(verb, setting, message, tmp_path):
    from slmkit.infer.chat import main as chat
    from slmkit.infer.generate import main as generate

    with pytest.raises(SystemExit, match="^error: " + message):  # the folder does not exist: checked first
        (generate if verb == "generate" else chat)(tmp_path / "no-model", **setting)


def test_json_output_separates_the_first_token_from_the_decoding_rate(tiny_model, capsys):
    """The first token waits for the prompt's forward pass (and a GPU's warm-up): counting it in the rate made a
    GPU's 455 tokens/s print as 92."""
    import json

    from slmkit.infer.generate import SamplingParams, generate_ids, load
    from slmkit.infer.generate import main as generate

    generate(tiny_model, prompt="To be", max_new_tokens=100, temperature=0, as_json=True, device="cpu")
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < row["first_token_seconds"] <= row["seconds"]
    # the tokens sampled, not the text re-tokenized (which a stop string or a split UTF-8 character would change)
    lm = load(tiny_model)
    sampled = list(generate_ids(lm.model, lm.encode("To be"), SamplingParams(max_new_tokens=100, temperature=0),
                                lm.eos_ids, lm.context))
    assert row["tokens"] == len(sampled) > 1 and row["tokens_per_s"] > 0
    stop = row["text"][-6:-3]
    generate(tiny_model, prompt="To be", max_new_tokens=100, temperature=0, as_json=True, stop=[stop])
    cut = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cut["text"] == row["text"][:row["text"].find(stop)]
    # the tokens that made the stop string count too (the text re-tokenized misses them)
    assert cut["tokens"] > len(lm.tokenizer(cut["text"], add_special_tokens=False)["input_ids"])
    # the rate counts the tokens after the first over the time after it (the JSON's seconds are rounded to 1 ms)
    after = row["seconds"] - row["first_token_seconds"]
    assert row["tokens_per_s"] == pytest.approx((row["tokens"] - 1) / after, rel=0.1)


def test_a_prompt_too_long_for_the_context_is_cut_with_room_to_answer_and_said_so(tiny_model, capsys):
    """A prompt over the context used to be cut to context - 1 tokens without a word, leaving room for one token."""
    import json

    from slmkit.infer.generate import fit_prompt, load
    from slmkit.infer.generate import main as generate

    assert fit_prompt(list(range(10)), 5, 64) == (list(range(10)), 0)
    assert fit_prompt(list(range(100)), 20, 64) == (list(range(56, 100)), 56)  # room for all 20 new tokens
    assert fit_prompt(list(range(100)), 300, 64) == (list(range(68, 100)), 68)  # at least half the context kept
    lm = load(tiny_model)
    long_prompt = "To be, or not to be, that is the question. " * 40
    assert len(lm.encode(long_prompt)) > lm.context
    generate(tiny_model, prompt=long_prompt, max_new_tokens=20, temperature=0, as_json=True, stop=["\x00"])
    out = capsys.readouterr()
    row = json.loads(out.out.strip().splitlines()[-1])
    assert row["prompt_tokens_dropped"] == len(lm.encode(long_prompt)) - (lm.context - 20)
    assert row["tokens"] == 20  # the whole answer fits (no EOS in this tiny model's greedy continuation)
    assert f"its first {row['prompt_tokens_dropped']} tokens were dropped" in out.err
    generate(tiny_model, prompt="To be", max_new_tokens=5, temperature=0, as_json=True)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompt_tokens_dropped"] == 0
