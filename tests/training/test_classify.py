"""Sequence classification: `slm finetune --task classify` (slmkit.training.classify), `slm eval` and `slm classify`."""

import json

import numpy as np
import pytest
import torch
from tiny_encoders import tiny_mlm_folder, toy_rows, wordpiece, write_csv, write_jsonl

from slmkit.data.labelled import stratified_split
from slmkit.infer.classify import classification_metrics
from slmkit.training.classify import finetune


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny random BERT folder and a separable two-label task (train CSV, held-out CSV)."""
    d = tmp_path_factory.mktemp("toy")
    tiny_mlm_folder(d / "bert", wordpiece())
    rows = toy_rows(240, seed=1)
    return {"base": d / "bert", "train": write_csv(d / "train.csv", rows[:200]),
            "eval": write_csv(d / "eval.csv", rows[200:]), "dir": d}


@pytest.fixture(scope="module")
def classifier(toy):
    out = toy["dir"] / "clf"
    summary = finetune(toy["base"], toy["train"], out, eval_data=toy["eval"], epochs=12, lr=3e-3, batch_size=16,
                       progress=False)
    return out, summary


def test_classification_metrics_match_hand_computed_values():
    m = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.8) and m["per_class"]["c"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_stratified_split_holds_out_every_label():
    labels = ["a"] * 20 + ["b"] * 5 + ["c"] * 2
    train, held = stratified_split(labels, 0.1, seed=0)
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(27))
    assert {labels[i] for i in held} == {"a", "b", "c"} and {labels[i] for i in train} == {"a", "b", "c"}


def test_fit_stops_when_the_evaluation_asks_it_to():
    from slmkit.training.fit import Budget, FitConfig, FitState, fit
    from slmkit.training.optim import make_optimizer

    model = torch.nn.Linear(4, 2)
    evals = []

    def evaluate(m):
        evals.append(1)
        return {"loss": 1.0, "tokens": 1, "stop": len(evals) >= 2}  # early stopping: the second evaluation says stop

    def loss_fn(m, x, y):
        return torch.nn.functional.cross_entropy(m(x), y)

    state = fit(model, make_optimizer(model, 1e-2, 0.0, "cpu"), lambda: (torch.randn(8, 4), torch.zeros(8).long()),
                loss_fn, Budget(steps=100), FitConfig(eval_every_steps=5, progress_bar=False), FitState(),
                evaluate=evaluate)
    assert state.step == 10 and len(evals) == 2


def test_a_tiny_classifier_learns_a_separable_task(classifier):
    out, summary = classifier
    assert summary["accuracy"] >= 0.9 and summary["macro_f1"] >= 0.9, summary
    metrics = json.loads((out / "classification_metrics.json").read_text())
    assert set(metrics["per_class"]) == {"neg", "pos"} and metrics["examples"] == 40
    assert np.asarray(metrics["confusion_matrix"]).sum() == 40
    for name in ("confusion_matrix.png", "loss.png", "metrics.jsonl", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name


def test_id2label_survives_save_and_transformers_reproduces_the_logits(toy, classifier, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from slmkit.model.folder import save_model

    out, _ = classifier
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert reloaded.config.id2label == {0: "neg", 1: "pos"} and reloaded.config.label2id == {"neg": 0, "pos": 1}
    # slmkit's writer -> transformers' reader: the very same function
    model = AutoModelForSequenceClassification.from_pretrained(toy["base"], num_labels=3,
                                                               id2label={0: "x", 1: "y", 2: "z"}).eval()
    save_model(model, tmp_path / "c")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "c").eval()
    assert again.config.id2label == {0: "x", 1: "y", 2: "z"}
    enc = AutoTokenizer.from_pretrained(out)(["the food was great", "a sad and ugly day"], padding=True,
                                             return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, again(**enc).logits)


def test_eval_on_a_classifier_reports_accuracy_and_macro_f1(toy, classifier, capsys):
    from slmkit.infer.evaluate import main as evaluate

    out, summary = classifier
    result = evaluate(out, [str(toy["eval"])], as_json=True)
    printed = json.loads(capsys.readouterr().out)
    assert {"loss", "accuracy", "macro_f1"} <= set(printed)
    assert printed["accuracy"] == pytest.approx(summary["accuracy"]) == pytest.approx(result["accuracy"])


def test_classify_verb_prints_top_k_labels_with_probabilities(toy, classifier, capsys, tmp_path):
    from slmkit.infer.classify import main as classify

    out, _ = classifier
    (r,) = classify(out, text="what a wonderful and lovely day", top_k=2, as_json=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed == r and [x["label"] for x in r["labels"]] == ["pos", "neg"]
    assert sum(x["score"] for x in r["labels"]) == pytest.approx(1.0, abs=1e-5)
    texts = tmp_path / "texts.txt"
    texts.write_text("terrible awful food\nsuperb and excellent show\n")
    results = classify(out, data=texts)
    assert [r["labels"][0]["label"] for r in results] == ["neg", "pos"]


def test_lora_classifier_saves_and_reloads_its_head(toy, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "lora"
    summary = finetune(toy["base"], toy["train"], out, lora=True, steps=30, lr=5e-3, batch_size=16, progress=False)
    assert summary["lora"] and summary["steps"] >= 1
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("classifier" in k for k in keys) and any("lora_A" in k for k in keys)  # the head travels along
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    base = AutoModelForSequenceClassification.from_pretrained(toy["base"], num_labels=2)
    adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    enc = AutoTokenizer.from_pretrained(out)(["the food was great", "a sad day"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = adapter(**enc).logits
        torch.testing.assert_close(merged(**enc).logits, expected, atol=1e-5, rtol=1e-4)
        untrained = AutoModelForSequenceClassification.from_pretrained(toy["base"], num_labels=2)
    assert not torch.equal(merged.classifier.weight, untrained.classifier.weight)
    assert merged.config.id2label == {0: "neg", 1: "pos"}


def test_bad_classification_data_are_one_line_errors(toy, tmp_path):
    base = toy["base"]

    def fails(match, data, **kw):
        with pytest.raises(SystemExit, match=match) as e:
            finetune(base, data, tmp_path / "never", progress=False, steps=1, **kw)
        assert "\n" not in str(e.value.code) and str(e.value.code).startswith("error: ")

    rows = toy_rows(60)
    fails("no 'label' column .*--label-col", write_csv(tmp_path / "a.csv", rows, header=("text", "category")))
    fails("no 'body' column .*--text-col", write_csv(tmp_path / "b.csv", rows), text_col="body")
    fails(r"b\.jsonl:1: no 'label' column", write_jsonl(tmp_path / "b.jsonl", [{"text": "hi", "y": 1}]))
    fails("single label", write_csv(tmp_path / "c.csv", [(t, "pos") for t, _ in rows]))
    fails(r"d\.csv:3: empty text", write_csv(tmp_path / "d.csv", [("fine", "a"), ("", "b")] + rows))
    fails("60 distinct values in 60 rows: probably not a label column",
          write_csv(tmp_path / "e.csv", [(t, f"row-{i}") for i, (t, _) in enumerate(rows)]))
    (tmp_path / "f.txt").write_text("just text\n")
    fails("plain text; labelled data must be CSV", tmp_path / "f.txt")
    good = write_csv(tmp_path / "g.csv", rows)  # numbers that cannot train, named before any work
    fails("--lora-r 0 must be positive", good, lora=True, lora_r=0)
    fails("--batch-size 0 must be positive", good, batch_size=0)
    fails("--epochs 0 must be positive", good, epochs=0)
    assert not (tmp_path / "never").exists()  # nothing half-written


def test_classifying_with_a_folder_that_is_not_a_classifier_is_a_one_line_error(toy):
    from slmkit.infer.classify import main as classify

    with pytest.raises(SystemExit, match="is not a classifier .*BertForMaskedLM.*slm finetune"):
        classify(toy["base"], text="hello")


@pytest.mark.parametrize("setting", [dict(top_k=0), dict(batch_size=0), dict(max_length=0)])
def test_slm_classify_names_a_size_below_one(setting, tmp_path):
    from slmkit.infer.classify import main as classify

    flag, value = next(iter(setting.items()))
    with pytest.raises(SystemExit, match=f"^error: --{flag.replace('_', '-')} {value} must be positive"):
        classify(tmp_path / "no-model", text="hello", **setting)  # before the folder is read


def test_fine_tuning_a_collapsed_encoder_warns_that_it_is_undertrained(toy, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from slmkit.infer.classify import representation_spread
    from slmkit.model.folder import save_model
    from slmkit.model.tokenizer import load_tokenizer

    tok = load_tokenizer(toy["base"])
    seqs = tok([t for t, _ in toy_rows(16)])["input_ids"]
    model = AutoModelForSequenceClassification.from_pretrained(toy["base"], num_labels=2)
    assert representation_spread(model, seqs, tok.pad_token_id) > 0.05  # a random encoder tells texts apart
    with torch.no_grad():  # every token the same vector: what an early masked LM's features look like
        model.bert.embeddings.word_embeddings.weight.zero_()
        model.bert.embeddings.position_embeddings.weight.zero_()
    assert representation_spread(model, seqs, tok.pad_token_id) < 1e-3
    save_model(model, tmp_path / "collapsed")
    tok.save_pretrained(tmp_path / "collapsed")
    finetune(tmp_path / "collapsed", toy["train"], tmp_path / "clf", steps=1, progress=False)
    assert "undertrained" in capsys.readouterr().out
    finetune(toy["base"], toy["train"], tmp_path / "clf2", steps=1, progress=False)
    assert "undertrained" not in capsys.readouterr().out


def test_every_flag_a_classifier_run_cannot_use_is_refused_and_dtype_is_honoured(toy, tmp_path, capsys):
    """They used to be dropped without a word: --tokens, --block-size, --checkpoint-every, --sampling ..."""
    from slmkit.training.finetune import main as finetune_verb

    good = write_csv(tmp_path / "g.csv", toy_rows(60))
    for flag, value, hint in [("tokens", "1M", "--epochs, --steps or --time"), ("block_size", 64, "--max-length"),
                              ("checkpoint_every", "1m", "no checkpoint"), ("sampling", "random", "epochs"),
                              ("resume", True, "no checkpoint"), ("eval_tokens", 1000, "whole held-out split")]:
        with pytest.raises(SystemExit, match=f"^error: --{flag.replace('_', '-')} does not apply to --task "
                                             f"classify: .*{hint}"):
            finetune_verb(toy["base"], [str(good)], tmp_path / "never", task="classify", **{flag: value})
    assert not (tmp_path / "never").exists()
    finetune_verb(toy["base"], [str(good)], tmp_path / "bf16", task="classify", dtype="bf16", steps=2,
                  progress=False)
    assert "| bf16" in capsys.readouterr().out  # the start line says the precision it trains in


def test_a_base_folder_missing_a_layer_is_refused_not_fine_tuned_from_random_weights(toy, tmp_path):
    """Only the new head (and BERT's pooler) may start from scratch; a folder whose weights lack a layer used to be
    fine-tuned with that layer randomly initialised, in silence."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(toy["base"], broken)
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layer.0.attention.self.query." not in k},
              broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=r"model.safetensors does not hold the weights .*missing .*layer\.0\."):
        finetune(broken, toy["train"], tmp_path / "out", epochs=1, progress=False)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    from slmkit.distill.student import load_for_task

    with pytest.raises(SystemExit, match="missing .*layer\\.0\\."):
        load_for_task(broken, "classify", {0: "a", 1: "b"})
    assert load_for_task(toy["base"], "classify", {0: "a", 1: "b"}).config.num_labels == 2  # the head is new: fine
