"""Speculative decoding (slmkit/compose/speculative.py): greedy identity, the rejection rule's distribution, both
caches rolled back, adaptive K, the CLI, chat and serve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import TINY, bpe_tokenizer

from slmkit.compose.speculative import (
    K_MAX,
    DraftLength,
    NgramIndex,
    SpecStats,
    attach_draft,
    judge,
    speculative_ids,
)
from slmkit.infer.generate import load
from slmkit.infer.sampling import SamplingParams, candidates


def llama_folder(path: Path, tok, seed: int, noise_of: Path | None = None, noise: float = 0.0,
                 blank_head: bool = False, no_attention: bool = False) -> Path:
    """A random 2-layer Llama whose next token depends on its context (untied head, wide init). NOISE_OF: start from
    that folder's weights plus Gaussian noise: a draft that agrees with it part of the time. BLANK_HEAD: every logit
    0, so greedy always says token 0: a draft that is always wrong where the target never says 0. NO_ATTENTION:
    attention adds nothing, so the next token depends on the current one only and greedy text soon cycles."""
    from slmkit.infer.load import load_model
    from slmkit.model.folder import save_model
    from slmkit.model.llama import Llama

    torch.manual_seed(seed)
    model = Llama({**TINY, "vocab_size": len(tok), "tie_word_embeddings": False, "initializer_range": 0.3,
                   "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id})
    if noise_of is not None:
        model.load_state_dict(load_model(noise_of).state_dict())
        with torch.no_grad():
            for w in model.parameters():
                w.add_(torch.randn_like(w) * noise * w.std())
    if blank_head:
        torch.nn.init.zeros_(model.lm_head.weight)
    if no_attention:
        for block in model.layers:
            torch.nn.init.zeros_(block.wo.weight)
    save_model(model, path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spec")
    tok = bpe_tokenizer()
    target = llama_folder(root / "target", tok, 0)
    return {"target": target, "wrong": llama_folder(root / "wrong", tok, 1, blank_head=True),
            "near": llama_folder(root / "near", tok, 2, noise_of=target, noise=0.05),
            "other_tok": llama_folder(root / "other_tok", _other_tokenizer(), 3),
            "looping": llama_folder(root / "looping", tok, 4, no_attention=True)}


def _other_tokenizer():
    from slmkit.model.tokenizer import train_bpe

    return train_bpe(["completely different words for another vocabulary entirely " * 20], 280)


PROMPT = "the cat sat on"
GREEDY = SamplingParams(max_new_tokens=80, temperature=0)


def alone(lm, p: SamplingParams = GREEDY, prompt: str = PROMPT) -> list[int]:
    return list(lm.decode(lm.model, lm.encode(prompt), p, lm.eos_ids, lm.context))


@pytest.mark.parametrize("draft,k,acceptance", [("target", 4, 1.0), ("wrong", 4, 0.0), ("near", 3, None),
                                                ("near", None, None), ("target", None, 1.0)])
def test_greedy_text_is_the_targets_token_for_token(folders, draft, k, acceptance):
    ref = alone(load(folders["target"]))
    assert 0 not in ref  # the blank-headed draft's only guess
    lm = load(folders["target"])
    attach_draft(lm, load(folders[draft]), k)
    out = alone(lm)
    assert out == ref and len(out) == 80
    stats = lm.spec_stats
    if acceptance is not None:
        assert stats.acceptance_rate == acceptance
    else:  # the noisy copy agrees sometimes: some guesses kept, some rolled back
        assert 0.1 < stats.acceptance_rate < 0.95
    if acceptance == 1.0 and k:  # an always-right draft: K+1 tokens per target pass (the last may be shorter)
        assert stats.cycles <= math.ceil(80 / (k + 1)) + 2
    assert stats.emitted == 80


def test_adaptive_k_stops_guessing_when_the_draft_is_always_wrong(folders):
    lm = load(folders["target"])
    attach_draft(lm, load(folders["wrong"]))
    alone(lm)
    # 80 tokens: a few guesses while the prior fades, then one probe every PROBE cycles (a draft never dropped would
    # propose 80 or more; the margin is for timings measured on a busy machine, which the policy also weighs)
    assert lm.spec_stats.proposed < 32 and lm.spec_stats.cycles == 80, lm.spec_stats


def test_draft_length_policy_follows_acceptance_and_cost():
    good, bad = DraftLength(), DraftLength()
    for _ in range(30):
        good.update(6, 6, t_draft=6 * 0.001, t_pass=0.02)  # every guess kept, a draft step 1/20 of a pass
        bad.update(6, 0, t_draft=6 * 0.01, t_pass=0.02)  # none kept, a draft step half a pass
    assert good.k >= 8 and bad.k == 0
    assert DraftLength(fixed=3).k == 3
    # a CPU whose target pass costs 1.5x a step at 3 tokens: a 1-in-5 hit rate does not pay for it, every guess kept
    # does (estimated rate 1/5: one guess kept per cycle every 4 cycles, then rejected)
    for kept, want in (([0, 0, 0, 1], 0), ([2, 2, 2, 2], K_MAX)):
        pol = DraftLength()
        for i in range(40):
            pol.update(0, 0, 0.0, t_pass=0.030)
            pol.update(2, kept[i % 4], t_draft=2 * 0.003, t_pass=0.045)
        assert pol.best == want
        assert abs(pol.pass_time(5) - 0.060) < 1e-9  # a line through the two measured pass sizes


def test_rolls_back_when_the_sequence_outgrows_the_drafts_context(folders, tmp_path):
    """A draft with a 40-token context: past it, the target goes on alone, with the same text."""
    cfg = json.loads((folders["near"] / "config.json").read_text())
    short = tmp_path / "short"
    short.mkdir()
    for f in folders["near"].iterdir():
        (short / f.name).write_bytes(f.read_bytes())
    (short / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 40}))
    lm = load(folders["target"])
    attach_draft(lm, load(short), 4)
    assert alone(lm) == alone(load(folders["target"]))
    assert 0 < lm.spec_stats.proposed < 80


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0  # nothing drawn where the target puts no mass
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("settings", [dict(temperature=1.0, top_k=0), dict(temperature=0.7, top_k=4, top_p=0.9)])
def test_rejection_rule_draws_from_the_targets_distribution(settings):
    """judge() on a 6-token vocabulary, draft tokens drawn from a very different Q: the first emitted token (kept
    guess or correction) follows the target's sampling distribution P (chi-square, p = 0.001)."""
    p = SamplingParams(**settings)
    target = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    draft = torch.tensor([-1.0, 0.0, 2.0, 1.0, 1.5, -2.0])
    from slmkit.compose.speculative import dense_probs
    from slmkit.infer.sampling import draw

    P, Q = dense_probs(target, p, None, 6), dense_probs(draft, p, None, 6)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    for _ in range(6000):
        d = draw(Q, gen)
        kept, own = judge(torch.stack([target, target]), [d], [Q], [], p, gen)
        counts[d if kept else own] += 1
    support = int((P > 0).sum())
    critical = {6: 20.52, 4: 16.27, 3: 13.82, 2: 10.83}[support]  # chi-square, support - 1 dof, p = 0.001
    assert chi_square(counts, P) < critical
    probs, ids = candidates(target.clone(), p)
    assert torch.allclose(P[ids] if ids is not None else P, probs / probs.sum())


def test_sampled_decoding_follows_the_target_end_to_end(folders):
    """The first token of 300 seeded speculative runs with a draft that often disagrees (top-k 4, T = 1) follows the
    target's next-token distribution; the same seed gives the same text."""
    target, draft = load(folders["target"]), load(folders["near"])
    p = SamplingParams(max_new_tokens=3, temperature=1.0, top_k=4)
    ids = target.encode(PROMPT)
    with torch.inference_mode():
        logits = target.model(torch.tensor([ids]))[0, -1]
    probs, top = candidates(logits.float(), p)
    counts = torch.zeros(4)
    for seed in range(300):
        p.seed = seed
        first = next(speculative_ids(target.model, draft.model, ids, p, set(), target.context, draft.context, 2))
        counts[top.tolist().index(first)] += 1
    assert chi_square(counts, probs / probs.sum()) < 16.27  # 3 dof, p = 0.001
    p.seed = 7
    run = lambda: list(speculative_ids(target.model, draft.model, ids, p, set(), 256, 256, 2))  # noqa: E731
    assert run() == run()


def test_draft_tokens_out_of_range_is_refused_before_anything_loads(tmp_path):
    from slmkit.infer.chat import main as chat
    from slmkit.infer.generate import main as generate

    missing = tmp_path / "no-model"  # nothing to load: the number is checked first
    for k in (0, 65):
        for verb in (generate, chat):
            with pytest.raises(SystemExit, match=rf"--draft-tokens {k} must be 1-64"):
                verb(missing, draft=missing, draft_tokens=k)


def test_a_draft_with_another_tokenizer_is_one_line_naming_distill(folders):
    lm = load(folders["target"])
    with pytest.raises(SystemExit, match=r"tokenizer .* differs .*slm distill --teacher"):
        attach_draft(lm, load(folders["other_tok"]))


def test_compiled_draft_and_bf16(folders):
    """The draft's numerics never change the greedy text (only the target's do): a compiled draft gives the target's
    text. In bf16 both models run and a self-draft is accepted."""
    ref = alone(load(folders["target"]))
    lm = load(folders["target"])
    attach_draft(lm, load(folders["near"], compile=True), 3)
    assert lm.draft.model.compiled_step is not None
    assert alone(lm) == ref
    lm = load(folders["target"], dtype="bf16")
    attach_draft(lm, load(folders["target"], dtype="bf16"), 3)
    assert len(alone(lm)) == 80 and lm.spec_stats.acceptance_rate > 0.8


def test_generate_cli_json_reports_acceptance(folders, capsys):
    from slmkit.infer.generate import main

    args = dict(prompt=PROMPT, max_new_tokens=30, temperature=0, as_json=True, device="cpu")
    plain = main(folders["target"], **args)
    capsys.readouterr()
    texts = main(folders["target"], draft=folders["near"], draft_tokens=3, **args)
    row = json.loads(capsys.readouterr().out)
    assert texts == plain and 0 < row["acceptance_rate"] < 1 and row["draft_proposed"] > 0
    assert row["tokens"] == 30


def test_serve_decodes_a_lone_request_speculatively(folders):
    import openai
    from tiny_server import running, serve_folders

    from slmkit.serve.registry import serve_drafts

    app = serve_folders({"t": folders["target"]})
    served = app.state.models
    with pytest.raises(SystemExit, match="not a decoder served here"):
        serve_drafts(served, [f"nope={folders['near']}"])
    serve_drafts(served, [str(folders["near"])], draft_tokens=3)
    ref = load(folders["target"])
    want = ref.tokenizer.decode(alone(ref, SamplingParams(max_new_tokens=20, temperature=0)), skip_special_tokens=True)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        got = client.completions.create(model="t", prompt=PROMPT, max_tokens=20, temperature=0)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="t", prompt=PROMPT, max_tokens=20, temperature=0, stream=True))
        import httpx

        metrics = httpx.get(url + "/metrics").text
    assert got.choices[0].text == want == streamed
    assert got.usage.completion_tokens == 20
    stats: SpecStats = served["t"].engine.spec_stats
    assert stats is not None and stats.proposed > 0 and stats.emitted == 40
    assert f'slm_draft_tokens_total{{model="t",outcome="proposed"}} {stats.proposed}' in metrics


def test_engine_mixes_a_speculative_row_with_batched_ones(folders):
    """With a draft, a request that finds the engine idle decodes speculatively; requests arriving meanwhile are
    batched together: every text is still the target's own."""
    import threading
    import time

    from tiny_server import slowed

    from slmkit.serve.batching import Engine

    lm = load(folders["target"])
    attach_draft(lm, load(folders["near"]), 3)
    engine = Engine(lm, max_batch=4).start()
    slowed(engine, 0.005)  # the first row is still decoding when the others arrive
    p = SamplingParams(max_new_tokens=30, temperature=0)
    prompts = [lm.encode(t) for t in (PROMPT, "the dog sat", "hello there", "how are you")]
    got: list = [None] * 4
    run = lambda i: got.__setitem__(i, [t.id for t in engine.generate(prompts[i], p)])  # noqa: E731
    try:
        first = threading.Thread(target=run, args=(0,))
        first.start()
        t0 = time.time()
        while not engine.spec_rows and time.time() - t0 < 10:
            time.sleep(0.001)
        others = [threading.Thread(target=run, args=(i,)) for i in (1, 2, 3)]
        [t.start() for t in others]
        [t.join(60) for t in [first, *others]]
    finally:
        engine.stop()
    ref = load(folders["target"])
    assert got == [list(ref.decode(ref.model, ids, p, ref.eos_ids, ref.context)) for ids in prompts]
    assert engine.spec_stats.emitted >= 30 and engine.max_seen_batch >= 2


def test_ngram_index_guesses_what_followed_the_last_occurrence():
    index = NgramIndex()
    assert index.guess([5, 6, 7], 3) == []  # nothing repeated yet
    ids = [1, 2, 3, 4, 9, 1, 2, 3, 8, 1, 2]
    assert index.guess(ids, 3) == [3, 8, 1]  # [1, 2] last ended at 7 (the later occurrence wins): 3, 8, 1 followed
    assert index.guess(ids + [3], 2) == [8, 1]  # the 3-gram [1, 2, 3]
    assert index.guess(ids + [3, 7], 2) == []  # [3, 7] and [2, 3, 7] never occurred
    assert index.guess(ids + [3, 7], 0) == []


@pytest.mark.parametrize("with_draft", [False, True])
def test_lookup_keeps_the_greedy_text_and_guesses_where_text_repeats(folders, with_draft):
    # a model whose greedy text cycles: the text's own guesses are checked and kept, the output unchanged
    ref = alone(load(folders["looping"]))
    lm = load(folders["looping"])
    attach_draft(lm, load(folders["target"]) if with_draft else None, None, lookup=True)
    assert alone(lm) == ref
    st = lm.spec_stats
    assert st.lookup_proposed > 0 and st.lookup_accepted > 0 and st.emitted == 80
    assert (st.proposed > st.lookup_proposed) == with_draft  # the draft guesses where the text has no match
    assert st.as_dict()["lookup_accepted"] == st.lookup_accepted


def test_a_lookup_guess_is_judged_as_a_draft_that_is_sure():
    """A text guess is a draft whose distribution is all on the guessed token: kept with probability P(d), else a
    token drawn from P without d. The first emitted token follows P (chi-square, p = 0.001)."""
    p = SamplingParams(temperature=1.0, top_k=0)
    from slmkit.compose.speculative import dense_probs

    target = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    P = dense_probs(target, p, None, 6)
    sure = torch.zeros(6).index_fill_(0, torch.tensor([2]), 1.0)
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    for _ in range(6000):
        kept, own = judge(torch.stack([target, target]), [2], [sure], [], p, gen)
        counts[2 if kept else own] += 1
    assert chi_square(counts, P) < 20.52


def test_lookup_from_the_cli_and_serve(folders, capsys):
    from tiny_server import serve_folders

    from slmkit.infer.generate import main
    from slmkit.serve.registry import serve_drafts

    args = dict(prompt=PROMPT, max_new_tokens=40, temperature=0, as_json=True, device="cpu")
    plain = main(folders["looping"], **args)
    capsys.readouterr()
    assert main(folders["looping"], lookup=True, draft_tokens=4, **args) == plain  # --draft-tokens applies to it
    row = json.loads(capsys.readouterr().out)
    assert row["lookup_proposed"] > 0 and row["lookup_proposed"] == row["draft_proposed"]
    app = serve_folders({"t": folders["target"]})
    serve_drafts(app.state.models, [], lookup=True)
    assert app.state.models["t"].lm.lookup and app.state.models["t"].lm.draft is None
