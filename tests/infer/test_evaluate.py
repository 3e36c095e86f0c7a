import math

import pytest

from slmkit.infer.evaluate import bits_per_byte
from slmkit.infer.evaluate import main as evaluate


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


def test_fit_temperature_recovers_an_overconfident_models_temperature():
    """Text sampled from a model, scored by the same model with its logits sharpened 1.25x: the fitted temperature
    undoes the sharpening and lowers the loss."""
    import torch

    from slmkit.infer.evaluate import fit_temperature
    from slmkit.model.folder import build_model, scale_logits
    from slmkit.model.presets import build_config

    torch.manual_seed(0)
    model = build_model(build_config("slm-tiny", 64, {}, block_size=64)).eval()
    scale_logits(model, 8.0)  # a random init is near uniform: make its next-token distributions informative
    tokens = [0]
    with torch.no_grad():  # sampled window by window, each from the context an evaluation window gives it
        for _ in range(32):
            cache = model.new_cache(1, 65)
            for pos in range(64):  # the one-token decode step: the same logits as forward(), ~10x faster here
                tokens.append(int(torch.multinomial(model.step(tokens[-1], cache, pos).softmax(-1), 1)))
    tokens = torch.tensor(tokens + [0]).numpy()  # eval_windows leaves the last token out
    temp, before, after = fit_temperature(model, tokens, 64)
    assert 0.93 <= temp <= 1.07 and after <= before  # calibrated already: T near 1
    scale_logits(model, 1.25)
    temp, before, after = fit_temperature(model, tokens, 64)
    assert 1.15 <= temp <= 1.35 and after < before - 0.005


@pytest.mark.parametrize("data, flag, value", [
    ("chat", "max_tokens", 100), ("chat", "text_col", "body"), ("chat", "replace_errors", True),
    ("chat", "label_col", "y"), ("text", "label_col", "y")])
def test_eval_refuses_a_flag_its_data_would_not_read(tmp_path, data, flag, value):
    """Chat JSONL is scored whole from its messages: --max-tokens, --text-col and --replace-errors were dropped."""
    from tiny_models import tiny_llama_folder, write_chats

    folder = tiny_llama_folder(tmp_path / "m")
    path = write_chats(tmp_path / "c.jsonl") if data == "chat" else tmp_path / "t.txt"
    if data == "text":
        path.write_text("the cat sat on the mat. " * 40)
    with pytest.raises(SystemExit, match=f"^error: --{flag.replace('_', '-')} does not apply to `slm eval` on "):
        evaluate(folder, [str(path)], **{flag: value})
    assert evaluate(folder, [str(path)])["tokens"] > 0  # without it: scored


@pytest.mark.parametrize("flag, value", [("max_tokens", 10), ("block_size", 16), ("replace_errors", True),
                                         ("skip_bad_lines", True)])
def test_eval_on_a_classifier_refuses_window_and_text_flags(tmp_path, flag, value):
    """A classifier scores every labelled row whole: the windowing and raw-text flags had no effect."""
    from tiny_encoders import tiny_bert_config, toy_rows, wordpiece, write_csv
    from transformers import BertForSequenceClassification

    tok = wordpiece()
    BertForSequenceClassification(tiny_bert_config(tok, num_labels=2, id2label={0: "neg", 1: "pos"},
                                                   label2id={"neg": 0, "pos": 1})).save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    rows = write_csv(tmp_path / "rows.csv", toy_rows(12))
    with pytest.raises(SystemExit, match=f"^error: --{flag.replace('_', '-')} does not apply to `slm eval` on a "
                                         "classifier folder"):
        evaluate(tmp_path / "clf", [str(rows)], **{flag: value})
    assert evaluate(tmp_path / "clf", [str(rows)], device="cpu")["examples"] == 12
