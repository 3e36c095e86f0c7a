"""`slm distill`'s flags: every option of DistillConfig, grouped as `slm train` groups its own."""

from __future__ import annotations

from pathlib import Path

from slmkit.distill.losses import LOSSES
from slmkit.distill.student import TASKS


def add_args(p) -> None:
    p.add_argument("--teacher", type=Path, required=True, help="the teacher model folder (slm train / import / "
                   "finetune output, or a Hugging Face folder)")
    p.add_argument("--data", nargs="+", required=True, help="causal, mlm: text (.txt/.md, directories, globs, JSONL, "
                   "CSV/Parquet); classify: labelled rows (CSV/TSV/JSONL/Parquet with text and label columns)")
    p.add_argument("--out", type=Path, required=True, help="the student's model folder")
    g = p.add_argument_group("the student (one of)")
    g.add_argument("--student", help="a preset (a fresh model with the teacher's tokenizer, e.g. slm-7m, bert-mini) "
                   "or a model folder with the teacher's tokenizer")
    g.add_argument("--student-layers", type=int, help="the teacher cut to N evenly spaced layers (first and last "
                   "kept) with its embeddings and head: N = half is DistilBERT's initialisation")
    g = p.add_argument_group("the loss")
    g.add_argument("--task", choices=TASKS, help="causal: token-level KD on text; mlm: DistilBERT's triple loss; "
                   "classify: the teacher's soft labels (default: the teacher folder's kind)")
    g.add_argument("--temperature", type=float, help="softens both distributions; the soft loss is scaled by T^2 "
                   "(default: 2)")
    g.add_argument("--alpha", type=float, help="weight of the soft (teacher) loss, 1 - alpha on the data's own "
                   "labels: next tokens, class labels (default: 0.5)")
    g.add_argument("--loss", choices=LOSSES, help="kl: KL(teacher || student), covers every mode; reverse-kl: "
                   "KL(student || teacher), mode-seeking (MiniLLM); jsd: generalised Jensen-Shannon (GKD), "
                   "mixture weight --beta (default: kl)")
    g.add_argument("--beta", type=float, help="jsd's mixture weight of the teacher (default: 0.5, symmetric)")
    g.add_argument("--alpha-ce", type=float, help="mlm: weight of the soft cross-entropy (default: 5, DistilBERT's)")
    g.add_argument("--alpha-mlm", type=float, help="mlm: weight of the masked-LM loss (default: 2)")
    g.add_argument("--alpha-cos", type=float, help="mlm: weight of the hidden-state cosine loss, for students as "
                   "wide as the teacher (default: 1)")
    g = p.add_argument_group("the teacher's cost (causal)")
    g.add_argument("--cache-teacher", nargs="?", const="auto", metavar="DIR", help="run the teacher once over the "
                   "training windows and keep its top-k per position, memory-mapped (in DIR, default the slmkit "
                   "cache); later passes, resumes and further students read it instead of running the teacher")
    g.add_argument("--cache-k", type=int, help="tokens kept per position (default: 32; 6 bytes each)")
    g = p.add_argument_group("classify data")
    g.add_argument("--unlabelled", nargs="+", metavar="PATH", help="text without labels (one per line, or a text "
                   "column): the teacher labels it")
    g.add_argument("--eval-data", help="held-out labelled rows (default: a stratified --val-fraction of --data)")
    g.add_argument("--label-col", help="label column (default: label)")
    g.add_argument("--max-length", type=int, help="tokens per text (default: 128, at most the teacher's context)")
    g = p.add_argument_group("budget (the first one reached ends training; default 5 minutes, classify 3 epochs)")
    g.add_argument("--time", help="training time: 180, 3m, 1h")
    g.add_argument("--steps", help="optimizer steps")
    g.add_argument("--tokens", help="the student's training tokens, e.g. 5M")
    g.add_argument("--epochs", type=float, help="passes over the training data")
    g = p.add_argument_group("optimisation")
    g.add_argument("--block-size", type=int, help="tokens per window (default: 256 causal, 128 mlm)")
    g.add_argument("--batch-size", type=int, help="windows (rows) per micro-batch (default: 16, classify 32)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's for a fresh preset student "
                   "with Muon; 3e-4 causal, 5e-4 mlm, 1e-4 classify for a student taken from a model, with AdamW)")
    g.add_argument("--optimizer", choices=["adamw", "muon"], help="default: muon for a fresh Llama student, else "
                   "adamw")
    g.add_argument("--warmup", type=int, help="warmup steps (default: 5%% of a --steps budget, at most 100)")
    g.add_argument("--weight-decay", type=float, help="on weight matrices (default: 0)")
    g.add_argument("--clip", type=float, help="gradient-norm clip, 0 to disable (default: 1.0)")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], help="as slm train's (default: auto)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:1 …")
    g.add_argument("--seed", type=int, help="random seed (default: 1337)")
    g = p.add_argument_group("evaluation, checkpoints, output")
    g.add_argument("--val-fraction", type=float, help="held-out share of --data (default: 1%% of the text, at least "
                   "8 windows; classify 10%%, stratified)")
    g.add_argument("--eval-every", help="evaluate every N steps or every duration (30s, 2m)")
    g.add_argument("--eval-tokens", type=int, help="held-out tokens per periodic evaluation (default: 65,536)")
    g.add_argument("--patience", type=int, help="stop after this many evaluations over 1%% worse than the best; the "
                   "folder keeps the best weights (default: 3; 0 = run the whole budget)")
    g.add_argument("--checkpoint-every", help="checkpoint interval in training time (default: 2m)")
    g.add_argument("--text-col", help="text field/column for JSONL, CSV, Parquet (default: text)")
    g.add_argument("--replace-errors", action="store_true", default=None, help="causal, mlm: replace undecodable "
                   "bytes of text files instead of failing")
    g.add_argument("--resume", action="store_true", default=None, help="continue the run saved in --out")
    g.add_argument("--overwrite", action="store_true", default=None, help="replace a model already in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    g.add_argument("--json", dest="as_json", action="store_true", default=None, help="print the summary as one JSON "
                   "object (keys: final_eval, teacher_eval, retention, tokens_per_s, cache …)")
