"""Students: evenly spaced teacher layers (the first layer is the teacher's), presets with the teacher's vocabulary,
and the one-line error for a student with another tokenizer."""

from __future__ import annotations

import pytest
import torch

from slmkit.distill.student import check_same_tokenizer, cut_layers, make_student, spaced_layers
from tests.tiny_models import TINY, bpe_tokenizer, tiny_llama_folder


def test_spaced_layers_is_distilberts_choice():
    assert spaced_layers(12, 6) == [0, 2, 4, 7, 9, 11]  # DistilBERT: one layer out of two, first and last kept
    assert spaced_layers(4, 2) == [0, 3]
    assert spaced_layers(6, 1) == [0]
    assert spaced_layers(3, 3) == [0, 1, 2]
    with pytest.raises(SystemExit, match="--student-layers 5: the teacher has 4 layers"):
        spaced_layers(4, 5)


def test_cut_llama_keeps_the_teachers_layers_and_the_rest():
    from slmkit.model.llama import Llama

    torch.manual_seed(0)
    teacher = Llama({**TINY, "num_hidden_layers": 4, "vocab_size": 60, "tie_word_embeddings": False})
    student, keep = cut_layers(teacher, 2)
    assert keep == [0, 3] and len(student.layers) == 2 and student.config["num_hidden_layers"] == 2
    t, s = teacher.state_dict(), student.state_dict()
    for name, tensor in s.items():
        source = name.replace("layers.1.", "layers.3.")  # the student's second layer is the teacher's last
        assert torch.equal(tensor, t[source]), name
    assert torch.equal(s["layers.0.wqkv.weight"], t["layers.0.wqkv.weight"])  # the first layer equals the teacher's
    assert not torch.equal(s["layers.1.wqkv.weight"], t["layers.1.wqkv.weight"])
    x = torch.randint(60, (1, 8))
    assert student(x).shape == teacher(x).shape  # (1, 8, 60): same head, same vocabulary
    s["embed.weight"].add_(1.0)  # a copy, not a view: training the student leaves the teacher as it was
    assert not torch.equal(student.embed.weight, teacher.embed.weight)


def test_cut_bert_classifier():
    from transformers import BertForSequenceClassification

    from tests.tiny_encoders import tiny_bert_config, wordpiece

    torch.manual_seed(0)
    cfg = tiny_bert_config(wordpiece(), num_labels=3)
    cfg.num_hidden_layers = 4
    teacher = BertForSequenceClassification(cfg)
    student, keep = cut_layers(teacher, 2)
    assert keep == [0, 3] and student.config.num_hidden_layers == 2 and student.config.num_labels == 3
    assert torch.equal(student.bert.encoder.layer[0].attention.self.query.weight,
                       teacher.bert.encoder.layer[0].attention.self.query.weight)
    assert torch.equal(student.bert.encoder.layer[1].output.dense.weight,
                       teacher.bert.encoder.layer[3].output.dense.weight)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)


def test_preset_student_takes_the_teachers_vocabulary(tmp_path):
    from slmkit.model.folder import load_model

    tok = bpe_tokenizer()
    teacher_dir = tiny_llama_folder(tmp_path / "teacher", tokenizer=tok)
    teacher = load_model(teacher_dir)
    student, origin = make_student("slm-tiny", None, "causal", teacher, teacher_dir, tok, 64)
    assert origin == "preset slm-tiny" and student.config["vocab_size"] == teacher.config["vocab_size"]
    with pytest.raises(SystemExit, match="--task causal needs a decoder"):
        make_student("bert-tiny", None, "causal", teacher, teacher_dir, tok, 64)
    with pytest.raises(SystemExit, match="neither a model folder nor a preset"):
        make_student("slm-huge", None, "causal", teacher, teacher_dir, tok, 64)


def test_tokenizer_mismatch_is_one_line_with_the_fix(tmp_path):
    from slmkit.model.tokenizer import train_bpe

    teacher = tiny_llama_folder(tmp_path / "teacher", tokenizer=bpe_tokenizer())
    other = tiny_llama_folder(tmp_path / "other", tokenizer=train_bpe(["completely different words " * 50], 280))
    with pytest.raises(SystemExit) as e:
        check_same_tokenizer(teacher, other)
    msg = str(e.value)
    assert "\n" not in msg and "differs from the teacher's" in msg
    assert f"slm train --tokenizer-from {teacher}" in msg
    check_same_tokenizer(teacher, tiny_llama_folder(tmp_path / "same", seed=3, tokenizer=bpe_tokenizer()))
