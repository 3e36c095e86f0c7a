"""The two models of a distillation run: the teacher (frozen) and the student, which must share its tokenizer.

A student is one of:
- `--student PRESET`: a fresh model of a slmkit preset with the teacher's tokenizer and vocabulary;
- `--student DIR`: an existing model folder with the same tokenizer;
- `--student-layers N`: the teacher cut to N of its layers, evenly spaced from the first to the last, plus its
  embeddings, final norm and head (DistilBERT initialised its 6-layer student from BERT-base's 12 this way: one
  layer out of two; `spaced_layers(12, 6)` = [0, 2, 4, 7, 9, 11]).

Models are loaded per task: causal teachers and students on slmkit's fast Llama module where the folder allows it
(else transformers' AutoModelForCausalLM), masked LMs with AutoModelForMaskedLM, classifiers with
AutoModelForSequenceClassification (the teacher's labels).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch.nn as nn

from slmkit.infer.classify import is_classifier
from slmkit.model.folder import build_model, config_value, load_model, read_config, unwrap
from slmkit.model.llama import Llama
from slmkit.model.presets import PRESETS, build_config, is_encoder
from slmkit.model.tokenizer import load_tokenizer

TASKS = ("causal", "mlm", "classify")
# a transformer layer's index in a parameter name: layers.3. (Llama), encoder.layer.3. (BERT), transformer.layer.3.
# (DistilBERT), h.3. (GPT-2)
LAYER_INDEX = re.compile(r"(^|\.)(layers|layer|h|blocks)\.(\d+)\.")


def default_task(teacher_cfg: dict) -> str:
    """The task a teacher folder implies: a classifier's labels, an encoder's masked LM, else next-token."""
    if is_classifier(teacher_cfg):
        return "classify"
    return "mlm" if is_encoder(teacher_cfg) else "causal"


def load_for_task(model_dir: Path, task: str, labels: dict | None = None) -> nn.Module:
    """MODEL_DIR as the model TASK trains (float32); for classify, a folder without LABELS' head gets a fresh one."""
    read_config(model_dir)  # one-line error when it is not a model folder
    if task == "causal":
        return load_model(model_dir)
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    from slmkit.model.weights import HEADS, open_pretrained

    # checked loads: a missing layer is an error; a classifier head for LABELS (or a pooler) may start from scratch
    if task == "mlm":
        return open_pretrained(AutoModelForMaskedLM, model_dir, may_miss=("pooler.",), may_drop=True)
    extra = {} if labels is None else {"num_labels": len(labels), "id2label": labels,
                                       "label2id": {v: int(k) for k, v in labels.items()},
                                       "ignore_mismatched_sizes": True}
    return open_pretrained(AutoModelForSequenceClassification, model_dir, may_miss=HEADS, may_drop=True,
                           may_resize=True, **extra)


def check_same_tokenizer(teacher_dir: Path, student_dir: Path) -> None:
    """One line when the two folders' tokenizers differ: distillation compares distributions token by token."""
    t, s = load_tokenizer(teacher_dir), load_tokenizer(student_dir)
    if t.get_vocab() != s.get_vocab():
        raise SystemExit(f"error: --student {student_dir}: its tokenizer ({len(s):,} tokens) differs from the "
                         f"teacher's ({len(t):,} tokens, {teacher_dir}); teacher and student must share one. "
                         f"Make a student with it: slm train --tokenizer-from {teacher_dir} --preset slm-7m --out DIR, "
                         "or use --student PRESET or --student-layers N")


def spaced_layers(total: int, n: int) -> list[int]:
    """N layer indices out of TOTAL, evenly spaced, always the first and (for N > 1) the last."""
    if not 1 <= n <= total:
        raise SystemExit(f"error: --student-layers {n}: the teacher has {total} layers; choose 1 to {total}")
    if n == 1:
        return [0]
    return [round(i * (total - 1) / (n - 1)) for i in range(n)]


def layer_count(model: nn.Module) -> int:
    m = unwrap(model)
    return len(m.layers) if isinstance(m, Llama) else int(m.config.num_hidden_layers)


def cut_layers(teacher: nn.Module, n: int) -> tuple[nn.Module, list[int]]:
    """A copy of TEACHER keeping N of its layers (spaced_layers) and everything outside the layers -> (student,
    the teacher layers it holds, in order)."""
    m = unwrap(teacher)
    keep = spaced_layers(layer_count(m), n)
    if isinstance(m, Llama):
        student = Llama({**m.config, "num_hidden_layers": n})
    else:
        cfg = copy.deepcopy(m.config)
        cfg.num_hidden_layers = n
        if getattr(cfg, "layer_types", None):  # per-layer attention kinds (sliding / full) follow their layers
            cfg.layer_types = [cfg.layer_types[i] for i in keep]
        student = type(m)(cfg)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for name, tensor in m.state_dict().items():
        found = LAYER_INDEX.search(name)
        if found is None:
            state[name] = tensor.clone()
        elif int(found.group(3)) in new_index:
            start, end = found.span(3)
            state[name[:start] + str(new_index[int(found.group(3))]) + name[end:]] = tensor.clone()
    student.load_state_dict(state, strict=True)
    return student, keep


def preset_student(preset: str, task: str, teacher: nn.Module, tok, block: int, labels: dict | None) -> nn.Module:
    """A fresh model of PRESET with the teacher's vocabulary (its logits must be as wide as the teacher's)."""
    if preset not in PRESETS:
        raise SystemExit(f"error: --student {preset}: neither a model folder nor a preset; presets: "
                         f"{', '.join(PRESETS)}")
    if is_encoder(preset) != (task != "causal"):
        kind = "an encoder (bert-*, distilbert)" if task != "causal" else "a decoder (slm-*)"
        raise SystemExit(f"error: --student {preset}: --task {task} needs {kind} preset")
    cfg = build_config(preset, int(config_value(teacher, "vocab_size")), block_size=block)
    cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if task != "classify":
        return build_model(cfg)
    from transformers import AutoConfig, AutoModelForSequenceClassification

    hf = dict(cfg)
    model_type = hf.pop("model_type")
    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        model_type, **hf, num_labels=len(labels), id2label=labels,
        label2id={v: int(k) for k, v in labels.items()}))


def make_student(student: str | None, layers: int | None, task: str, teacher: nn.Module, teacher_dir: Path, tok,
                 block: int) -> tuple[nn.Module, str]:
    """The student a run starts from -> (model, how it was made, for the card)."""
    labels = _labels(teacher) if task == "classify" else None
    if layers is not None:
        if student is not None:
            raise SystemExit("error: give --student or --student-layers, not both")
        model, keep = cut_layers(teacher, layers)
        return model, f"teacher layers {keep} of {layer_count(teacher)}"
    if student is None:
        raise SystemExit("error: no student: give --student PRESET, --student DIR or --student-layers N")
    if Path(student).is_dir():
        check_same_tokenizer(teacher_dir, Path(student))
        model = load_for_task(Path(student), task, labels)
        return model, f"from {student}"
    return preset_student(student, task, teacher, tok, block, labels), f"preset {student}"


def _labels(teacher: nn.Module) -> dict:
    """The teacher classifier's id2label with int keys as strings (as config.json holds them)."""
    return {str(k): v for k, v in unwrap(teacher).config.id2label.items()}


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_vocabularies(teacher: nn.Module, student: nn.Module) -> None:
    t, s = int(config_value(teacher, "vocab_size")), int(config_value(student, "vocab_size"))
    if t != s:
        raise SystemExit(f"error: the student's logits cover {s:,} tokens, the teacher's {t:,}; a student needs the "
                         "teacher's tokenizer and vocabulary size")
