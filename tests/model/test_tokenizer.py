import re

import numpy as np
import pytest

from slmkit.model.tokenizer import byte_tokenizer, default_vocab_size, token_byte_lengths, train_bpe

TEXTS = ["Hello, world! Ünïcödé — 東京 🙂 tabs\tand\nnewlines  double  spaces", "ROMEO: But soft, what light?"]


@pytest.fixture(scope="module")
def bpe(corpus):
    return train_bpe([corpus.read_text()], vocab_size=400)


def test_bpe_round_trips_any_text_and_reloads_with_autotokenizer(bpe, tmp_path):
    from transformers import AutoTokenizer

    assert 300 < len(bpe) <= 400
    for text in TEXTS:
        ids = bpe(text, add_special_tokens=False)["input_ids"]
        assert bpe.decode(ids) == text
    bpe.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(TEXTS[0])["input_ids"] == bpe(TEXTS[0])["input_ids"]
    assert again(TEXTS[0])["input_ids"][0] == again.bos_token_id  # documents start with the separator


def test_byte_tokenizer_is_one_token_per_byte():
    tok = byte_tokenizer()
    assert len(tok) == 256 + 4
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_token_byte_lengths_sum_to_the_utf8_length(bpe):
    lengths = token_byte_lengths(bpe)
    for text in TEXTS:
        ids = bpe(text, add_special_tokens=False)["input_ids"]
        assert int(np.sum(lengths[ids])) == len(text.encode("utf-8"))
    assert lengths[bpe.eos_token_id] == 0


def test_chat_template_renders_chatml(bpe):
    text = bpe.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_default_vocab_grows_with_the_corpus():
    assert default_vocab_size(10_000) == 512
    assert default_vocab_size(1_000_000) == 1024
    assert default_vocab_size(10**10) == 32768


def test_vocab_too_small_is_an_error():
    with pytest.raises(SystemExit, match="too small"):
        train_bpe(["abc"], vocab_size=100)


def test_our_folders_load_without_autoconfig_and_match_autotokenizer(tiny_model):
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from slmkit.model.tokenizer import load_tokenizer

    ours, auto = load_tokenizer(tiny_model), AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    text = "ROMEO: But soft, what light <|im_end|> through yonder window breaks?"
    assert ours(text)["input_ids"] == auto(text)["input_ids"]
    assert ours.decode(ours(text)["input_ids"]) == auto.decode(auto(text)["input_ids"])
    assert (ours.eos_token_id, ours.pad_token_id, ours.chat_template) == (auto.eos_token_id, auto.pad_token_id,
                                                                         auto.chat_template)
    # the point of the direct path: no AutoConfig import chain (~2 s) at the start of generate/chat/eval/serve
    probe = ("import sys; from slmkit.model.tokenizer import load_tokenizer; load_tokenizer(sys.argv[1]); "
             "print('transformers.models.auto.configuration_auto' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, str(tiny_model)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_tokenizer_trained_from_word_counts_equals_one_trained_on_the_text(bpe, corpus):
    """Federated clients send word counts, not text (federate/vocab.py): the trainers read nothing else."""
    from slmkit.model.tokenizer import count_words, train_from_counts, train_wordpiece

    text = corpus.read_text()
    counts = count_words([text])
    assert counts["Ġthe"] == len(re.findall(r" the(?![^\W\d_])", text)) > 10  # " the", not " then" or " there"
    from_counts = train_from_counts(counts, 400)
    assert from_counts.get_vocab() == bpe.get_vocab()
    assert from_counts.decode(from_counts(TEXTS[0], add_special_tokens=False)["input_ids"]) == TEXTS[0]
    wp, wp_counts = train_wordpiece([text], 400), train_from_counts(count_words([text], "wordpiece"), 400, "wordpiece")
    same = set(wp.get_vocab()) & set(wp_counts.get_vocab())
    assert len(same) >= 0.97 * len(wp) and wp_counts.mask_token == "[MASK]"  # (ties may break the other way)
