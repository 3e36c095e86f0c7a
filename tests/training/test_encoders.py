"""BERT-family presets, WordPiece tokenizers and masked-LM pretraining (`slm train --preset bert-*`)."""

import json
import math

import pytest
import torch

from slmkit.data.mlm import MASK_PROB, MaskInfo, mask_tokens
from slmkit.model.folder import base_parameter_count, build_model
from slmkit.model.presets import ENCODERS, PRESETS, build_config

PUBLISHED = {"bert-tiny": 4_385_920, "bert-mini": 11_170_560, "bert-small": 28_763_648, "bert-medium": 41_373_184,
             "bert-base": 109_482_240, "distilbert": 66_362_880, "mobilebert": 24_844_544}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_encoder_preset_has_the_published_base_parameter_count(name):
    assert ENCODERS[name]["params"] == PUBLISHED[name] and PRESETS[name] is ENCODERS[name]
    cfg = build_config(name, ENCODERS[name]["vocab_size"])
    with torch.device("meta"):
        model = build_model(cfg)
    assert type(model).__name__.endswith("ForMaskedLM")  # pretraining builds the masked-LM model ...
    assert base_parameter_count(model) == PUBLISHED[name]  # ... and the count is the base model's, without heads


def test_info_reports_the_base_count_for_encoder_presets():
    from slmkit.infer.info import describe

    info = describe(preset="bert-mini")
    assert info["parameters"] == 11_170_560 and info["layers"] == 4 and info["hidden_size"] == 256
    assert describe(preset="distilbert")["intermediate_size"] == 3072


@pytest.mark.parametrize("lowercase", [False, True])
def test_wordpiece_round_trip_opens_in_autotokenizer(tmp_path, lowercase):
    from transformers import AutoTokenizer

    from slmkit.model.tokenizer import BERT_SPECIALS, train_wordpiece

    texts = ["The Quick brown fox jumps over the lazy dog.", "Foxes and dogs are friends, mostly."] * 40
    train_wordpiece(texts, 120, lowercase=lowercase).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert [tok.convert_tokens_to_ids(s) for s in BERT_SPECIALS] == [0, 1, 2, 3, 4]
    assert (tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token) == tuple(BERT_SPECIALS)
    text = "The lazy fox jumps over the brown dogs."
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == (text.lower() if lowercase else text)
    assert any(t.startswith("##") for t in tok.get_vocab())  # real WordPiece continuation pieces
    pair = tok("a fox", "a dog")["input_ids"]
    assert pair.count(tok.sep_token_id) == 2


def _info(vocab=1000):
    return MaskInfo(mask_id=4, vocab_size=vocab, special_ids=(0, 1, 2, 3, 4), cls_id=2)


def test_mask_tokens_selects_15_percent_split_80_10_10_and_never_specials():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 512), generator=gen)
    ids[:, 0], ids[:, -1], ids[:, 100] = 2, 3, 0  # [CLS] ... [PAD] ... [SEP]
    inputs, labels = mask_tokens(ids, _info(), torch.Generator().manual_seed(1))
    selected = labels != -100
    special = torch.isin(ids, torch.tensor([0, 1, 2, 3, 4]))
    assert not (selected & special).any() and torch.equal(inputs[special], ids[special])
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected])  # unselected tokens are never touched
    assert abs(selected.float().mean().item() / (1 - special.float().mean().item()) - MASK_PROB) < 0.01
    n = selected.sum().item()
    masked = (inputs[selected] == 4).sum().item() / n
    kept = (inputs[selected] == ids[selected]).sum().item() / n
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(1 - masked - kept - 0.1) < 0.02
    replaced = inputs[selected & (inputs != 4)]
    assert replaced.min() >= 5  # random replacements are ordinary tokens, never specials
    again = mask_tokens(ids, _info(), torch.Generator().manual_seed(1))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)  # the generator decides everything


def test_mask_tokens_always_predicts_at_least_one_token():
    ids = torch.tensor([[2, 7, 8, 3]])
    _, labels = mask_tokens(ids, _info(), torch.Generator().manual_seed(0), prob=0.0)
    assert (labels != -100).sum() == 1


def test_masked_lm_training_loss_falls_and_writes_an_encoder_folder(corpus, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from slmkit.infer.evaluate import main as evaluate
    from slmkit.infer.info import describe
    from slmkit.training.train import main as train

    out = tmp_path / "bert"
    narrow = ["hidden_size=64", "intermediate_size=128"]  # bert-tiny's depth at half its width: seconds on a CPU
    summary = train(data=[str(corpus)], out=out, preset="bert-tiny", set=narrow, vocab_size=256, steps=50,
                    block_size=64, batch_size=16, warmup=5, lr=5e-3, eval_every="25", progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["kind"] == "train")
    final = summary["final_eval"]
    assert math.log(len(AutoTokenizer.from_pretrained(out))) - 0.5 < first["loss"]  # starts near chance
    assert final["loss"] < first["loss"] - 0.3, (first, final)  # masked-LM loss on held-out text falls
    assert math.isnan(final["bits_per_byte"]) and final["tokens"] > 0
    assert any(r["kind"] == "eval" for r in rows) and (out / "loss.png").is_file()
    args = json.loads((out / "train_args.json").read_text())
    assert args["tokenizer"] == "wordpiece"  # chosen automatically for encoder presets
    assert args["optimizer"] == "adamw"  # Muon is the default for Llama decoders only
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForMaskedLM"] and cfg["model_type"] == "bert"
    model = AutoModelForMaskedLM.from_pretrained(out)  # a plain transformers folder
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.mask_token == "[MASK]" and model.config.vocab_size == len(tok)
    assert describe(out)["parameters"] == base_parameter_count(model)
    result = evaluate(out, [str(corpus)], max_tokens=4000)  # `slm eval` on an encoder: masked-LM loss
    assert abs(result["loss"] - final["loss"]) < 1.0 and math.isnan(result["bits_per_byte"])

    resumed = train(data=[str(corpus)], out=out, steps=60, resume=True, progress=False)  # budgets may grow
    assert resumed["step"] == 60 and math.isfinite(resumed["final_eval"]["loss"])


def test_encoder_preset_with_a_tokenizer_without_mask_is_a_one_line_error(corpus, tmp_path):
    from slmkit.training.train import main as train

    with pytest.raises(SystemExit, match="no \\[MASK\\] token"):
        train(data=[str(corpus)], out=tmp_path / "m", preset="bert-tiny", tokenizer="byte", steps=1, block_size=32,
              progress=False)
    assert not (tmp_path / "m").exists()  # refused before anything is written


def test_a_reused_tokenizer_that_pads_and_truncates_does_not_cut_the_corpus():
    from slmkit.model.tokenizer import encode_plain, train_wordpiece

    tok = train_wordpiece(["the cat sat on the mat and the dog sat on the log"] * 20, 60, lowercase=True)
    tok.backend_tokenizer.enable_truncation(4)  # as sentence-encoder folders (all-MiniLM-L6-v2) are saved
    tok.backend_tokenizer.enable_padding(length=4)
    (ids,) = encode_plain(tok, ["the cat sat on the mat and the dog sat on the log"])
    assert len(ids) > 4 and tok.pad_token_id not in ids
    assert tok.backend_tokenizer.truncation["max_length"] == 4  # the caller's tokenizer is left as it was
