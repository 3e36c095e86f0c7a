"""Verb `distill`: a smaller student trained on a teacher's distributions, as a pipeline of stages over DistillConfig.

    open_output -> teacher (frozen) + tokenizer -> task (training/stages.Task: data, KD loss, held-out evaluation)
      -> [--cache-teacher: the teacher's top-k over the data, once] -> student (preset | folder | teacher's layers)
      -> Session.fit (the loop, checkpoints, --resume, early stopping of `slm train`) -> finish (teacher scored on the
      same held-out split: retention; model card; summary)

The student is an ordinary model folder: it opens in transformers, exports, serves. See docs/distill.md.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from slmkit.distill import tasks
from slmkit.distill.losses import LOSSES
from slmkit.distill.student import (
    TASKS,
    check_vocabularies,
    default_task,
    freeze,
    load_for_task,
    make_student,
)
from slmkit.files import atomic_write_json
from slmkit.hardware import pick_device, pick_dtype, precision_name
from slmkit.infer.load import read_config
from slmkit.model.folder import config_value, count_parameters, unwrap
from slmkit.model.llama import Llama
from slmkit.model.tokenizer import load_tokenizer
from slmkit.options import check_numbers
from slmkit.training import recipe
from slmkit.training.config import RunConfig
from slmkit.training.fit import EarlyStop
from slmkit.training.optim import make_optimizer
from slmkit.training.stages import Session, Weights, cleans_up, fit_config, open_output

RUN_FILE = "distill_args.json"
# what a --resume must share with the saved run (budgets may grow; output settings are this invocation's)
SAME_ON_RESUME = ("teacher", "task", "student", "student_layers", "temperature", "alpha", "loss", "beta",
                  "block_size", "batch_size", "cache_k", "alpha_ce", "alpha_mlm", "alpha_cos")
DEFAULTS = {  # per task: (block or max length, batch, lr for a student taken from a model)
    "causal": (256, 16, 3e-4), "mlm": (128, 16, 5e-4), "classify": (128, 32, 1e-4)}


@dataclass(kw_only=True)
class DistillConfig(RunConfig):
    teacher: Path  # the teacher model folder
    data: list[str]  # causal/mlm: text; classify: labelled rows
    student: str | None = None  # a preset name or a model folder with the teacher's tokenizer
    student_layers: int | None = None  # or: the teacher cut to N evenly spaced layers
    task: str | None = None  # causal, mlm or classify (default: the teacher folder's kind)
    temperature: float = 2.0
    alpha: float = 0.5  # soft (teacher) loss weight; 1 - alpha on the hard labels
    loss: str = "kl"  # kl, reverse-kl, jsd
    beta: float = 0.5  # jsd's mixture weight
    alpha_ce: float = 5.0  # mlm: DistilBERT's weights of soft CE, masked-LM CE and hidden-state cosine
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    cache_teacher: str | None = None  # 'auto' (the slmkit cache) or a folder: the teacher's top-k, once
    cache_k: int = 32
    unlabelled: list[str] | None = None  # classify: text without labels (the teacher labels it)
    eval_data: str | None = None  # classify: held-out labelled rows (default: a stratified split of --data)
    label_col: str = "label"
    max_length: int | None = None  # classify: tokens per text
    epochs: float | None = None  # passes over the training data (a budget; classify's default: 3)
    optimizer: str | None = None  # muon (fresh Llama students) or adamw
    as_json: bool = False  # print the summary as one JSON object
    warmup: int | None = None
    weight_decay: float | None = 0.0
    origin: str = field(default="", repr=False)  # how the student was made (filled in by the run)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.teacher, self.data = Path(self.teacher), [str(d) for d in self.data]
        check_numbers({"temperature": self.temperature, "cache_k": self.cache_k, "epochs": self.epochs})
        if self.task not in (None, *TASKS):
            raise SystemExit(f"error: unknown --task {self.task!r}; use {', '.join(TASKS)}")
        if self.loss not in LOSSES:
            raise SystemExit(f"error: unknown --loss {self.loss!r}; use {', '.join(LOSSES)}")
        if not 0.0 <= self.alpha <= 1.0 or not 0.0 <= self.beta <= 1.0:
            raise SystemExit("error: --alpha and --beta are weights between 0 and 1")
        if self.cache_teacher is not None and self.task not in (None, "causal"):
            raise SystemExit("error: --cache-teacher is for --task causal (classify computes the teacher's labels "
                             "once anyway; mlm masks afresh every step)")


# The flags only some tasks read (the rest of DistillConfig is every task's): given for another task, each is refused
# in one line rather than dropped (refuse_unused).
_MLM_WEIGHTS = {k: "DistilBERT's loss weights are for --task mlm; causal and classify mix the teacher's and the "
                   "data's losses with --alpha" for k in ("alpha_ce", "alpha_mlm", "alpha_cos")}
_CLASSIFY_DATA = {"unlabelled": "it adds texts for --task classify to label", "eval_data": "it is --task classify's "
                  "held-out rows; text holds out --val-fraction of --data", "label_col": "text has no labels",
                  "max_length": "use --block-size (tokens per window)"}
NOT_FOR_TASK = {
    "causal": {**_MLM_WEIGHTS, **_CLASSIFY_DATA},
    "mlm": {**_CLASSIFY_DATA, **{k: "mlm's loss is DistilBERT's, weighted by --alpha-ce, --alpha-mlm, --alpha-cos"
                                 for k in ("alpha", "loss", "beta")}},
    "classify": {**_MLM_WEIGHTS, "block_size": "use --max-length (tokens per text)",
                 "eval_tokens": "a classifier is scored on its whole held-out split",
                 "checkpoint_every": "classify runs keep no checkpoint (they are minutes long)",
                 "cache_k": "the teacher's labels are computed once anyway",
                 "replace_errors": "labelled rows are read as UTF-8; re-encode the file"},
}


def refuse_unused(cfg: DistillConfig) -> None:
    """One line for a flag CFG's task (or its --loss, its cache) would not read, before anything is loaded."""
    from slmkit.options import defaults_of
    from slmkit.options import refuse_unused as refuse

    defaults, values = defaults_of(DistillConfig), vars(cfg)
    refuse(f"--task {cfg.task}", values, NOT_FOR_TASK[cfg.task], defaults)
    if cfg.loss != "jsd":
        refuse(f"--loss {cfg.loss}", values, {"beta": "it is jsd's mixture weight (--loss jsd)"}, defaults)
    if not cfg.cache_teacher:
        refuse("a run without --cache-teacher", values, {"cache_k": "it sizes the teacher cache: add --cache-teacher"},
               defaults)
    if cfg.alpha == 0 and cfg.task != "mlm":  # the soft loss has weight 0: the teacher is not run for training
        refuse("--alpha 0", values, dict.fromkeys(("temperature", "loss", "beta", "cache_teacher", "cache_k"),
                                                  "it shapes the teacher's soft loss, which --alpha 0 leaves out"),
               defaults)


def main(teacher: Path, data: list[str], out: Path, **options) -> dict:
    """Distill the model in TEACHER into a smaller student on DATA and write the student's model folder to OUT.

    The student trains on the teacher's softened distributions (--temperature) mixed with the data's own labels
    (--alpha), under the budgets, evaluation, checkpoints and --resume of `slm train`. Returns the summary
    (also OUT/training_summary.json): the student's and the teacher's held-out scores, the retention, tokens/s."""
    from slmkit.model.folder import read_config, refuse_quantized

    refuse_quantized(teacher, read_config(Path(teacher)))  # before the data is read
    options = {k: v for k, v in options.items() if v is not None}
    return run(DistillConfig.from_options("slm distill", teacher=teacher, data=data, out=out, **options))


@cleans_up()
def run(cfg: DistillConfig) -> dict:
    """The pipeline of `slm distill` over CFG (see the module docstring); returns the run's summary."""
    teacher_cfg = read_config(cfg.teacher)
    cfg.task = cfg.task or default_task(teacher_cfg)
    refuse_unused(cfg)
    if cfg.out.resolve() == cfg.teacher.resolve():
        raise SystemExit("error: --out must differ from the teacher's folder")
    saved = open_output(cfg.out, cfg.resume, cfg.overwrite, RUN_FILE, clear=cfg.task != "classify",
                        sources=[cfg.teacher, *cfg.data])
    if saved is not None:
        cfg = resumed(cfg, saved)
    elif cfg.task == "classify" and cfg.resume:
        raise SystemExit("error: --resume: classify runs keep no checkpoint")
    dev = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.teacher)
    teacher = freeze(load_for_task(cfg.teacher, cfg.task)).to(dev)
    block, bsz, _ = DEFAULTS[cfg.task]
    context = int(teacher_cfg.get("max_position_embeddings") or 512)
    cfg.block_size = min(cfg.block_size or block, context)
    cfg.batch_size = cfg.batch_size or bsz
    kd = tasks.KD(cfg.temperature, cfg.alpha, cfg.loss, cfg.beta)
    autocast = pick_dtype(cfg.dtype, dev, config_value(teacher, "hidden_size"))
    student, cfg.origin = make_student(cfg.student, cfg.student_layers, cfg.task, teacher, cfg.teacher, tok,
                                       cfg.block_size)
    if cfg.task != "classify":
        check_vocabularies(teacher, student)
    task, score_teacher, info = build_task(cfg, tok, teacher, student, kd, dev, autocast)
    student.to(dev).train()
    session = new_session(cfg, task, student, dev)
    if cfg.resume:
        session.resume()
    start_folder(session, cfg, tok)
    budget = budget_for(cfg, task)
    lr = session.optimizer.param_groups[0]["lr"]
    how = "alpha 0: the labels alone" if cfg.alpha == 0 and cfg.task != "mlm" else f"{cfg.loss}, T={cfg.temperature:g}"
    print(f"distill ({cfg.task}, {how}): {cfg.teacher.name} "
          f"({count_parameters(teacher):,} parameters) -> student {cfg.origin} ({count_parameters(student):,}) | "
          f"block {cfg.block_size} | batch {cfg.batch_size}x{cfg.grad_accum} | lr {lr:g} | {dev} "
          f"{precision_name(autocast)} | {task.note}")
    per_pass = max(1, task.batches_per_pass // cfg.grad_accum) if session.keep_best else None
    session.fit(budget, fit_config(cfg, budget, dev, lr, cfg.warmup if cfg.warmup is not None else
                                   min(100, max(1, (budget.steps or 1000) // 20)), autocast, per_pass))
    return finish(session, cfg, tok, score_teacher, info, dev)


def build_task(cfg: DistillConfig, tok, teacher, student, kd, dev: str, autocast) -> tuple:
    """-> (Task, the teacher's scorer on the held-out split, what the summary reports of the teacher's side)."""
    if cfg.task == "classify":
        if cfg.val_fraction is None:
            cfg.val_fraction = 0.1
        return tasks.classify_task(cfg, tok, teacher, kd, dev)
    data = tasks.causal_data(cfg, tok, cfg.block_size)
    if cfg.task == "mlm":
        return (*tasks.mlm_task(cfg, tok, teacher, student, data, cfg.block_size, kd, dev), {})
    cache, info = None, {}
    if cfg.cache_teacher:  # (refused with --alpha 0: refuse_unused)
        cache, info = tasks.cache_for(cfg, teacher, data, cfg.block_size, kd, dev, autocast)
    task, score = tasks.causal_task(cfg, tok, teacher, data, cfg.block_size, kd, dev, cache)
    return task, score, {"cache": info} if info else {}


def new_session(cfg: DistillConfig, task, student, dev: str) -> Session:
    """The student's optimizer and its run folder: Muon at the recipe's lr for a fresh Llama student (as `slm
    train` trains one), AdamW at the task's fine-tuning lr for a student taken from a model."""
    fresh = cfg.student is not None and not Path(cfg.student).is_dir()
    name = cfg.optimizer or ("muon" if fresh and isinstance(unwrap(student), Llama) else "adamw")
    lr = cfg.lr or (recipe.peak_lr(config_value(student, "hidden_size"), name) if fresh else DEFAULTS[cfg.task][2])
    optimizer = make_optimizer(student, lr, cfg.weight_decay, dev, name)
    classify = cfg.task == "classify"
    early = EarlyStop(cfg.patience, worse_by=0.0, min_step=task.batches_per_pass) if classify else \
        EarlyStop(cfg.patience)
    return Session(cfg.out, optimizer, task, Weights(student, cfg.out), early, eval_tokens=cfg.eval_tokens,
                   checkpoints=not classify)


def budget_for(cfg: DistillConfig, task):
    """--epochs as steps, else the flags' budget; classify with no budget runs 3 epochs."""
    epochs = cfg.epochs if cfg.epochs is not None else (
        3.0 if cfg.task == "classify" and not (cfg.steps or cfg.tokens or cfg.time) else None)
    if epochs is not None:
        cfg.steps = min(cfg.steps or math.inf, max(1, math.ceil(epochs * task.batches_per_pass / cfg.grad_accum)))
    return cfg.budget()


def run_file(cfg: DistillConfig) -> dict:
    saved = asdict(cfg)
    saved.update(teacher=str(cfg.teacher.resolve()), out=str(cfg.out))
    return json.loads(json.dumps(saved, default=str))


def resumed(cfg: DistillConfig, saved: dict) -> DistillConfig:
    """A --resume: the saved run's settings, which must match what this invocation names; its budgets may grow."""
    now = run_file(cfg)
    for key in SAME_ON_RESUME:
        if now.get(key) not in (None, saved.get(key)):
            raise SystemExit(f"error: --resume: --{key.replace('_', '-')} {now[key]!r} differs from the saved run's "
                             f"{saved.get(key)!r}; resume with the original settings or start a new --out")
    keep = {k: v for k, v in saved.items() if k in DistillConfig.__dataclass_fields__ and k not in (
        "out", "resume", "overwrite", "progress", "as_json", "steps", "tokens", "time", "epochs", "device")}
    return DistillConfig(**{**{k: getattr(cfg, k) for k in DistillConfig.__dataclass_fields__}, **keep})


def start_folder(session: Session, cfg: DistillConfig, tok) -> None:
    """The run file, the teacher's tokenizer and (decoders) generation config: the folder is usable at once."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.out / RUN_FILE, run_file(cfg))
    session.start_log(cfg.resume)
    tok.save_pretrained(cfg.out)
    gen = cfg.teacher / "generation_config.json"
    if cfg.task == "causal" and gen.is_file():
        shutil.copyfile(gen, cfg.out / "generation_config.json")


def finish(session: Session, cfg: DistillConfig, tok, score_teacher, info: dict, dev: str) -> dict:
    """The student's and the teacher's held-out scores on one split, the retention, the card and the summary."""
    from slmkit.distill.card import retention, write_card

    task = session.task
    final = task.evaluate(session.model, task.final_tokens) if task.evaluate else {}
    teacher_eval = score_teacher(task.final_tokens) if score_teacher and final else {}
    summary = {**session.summary(), "task": cfg.task, "teacher": str(cfg.teacher), "student": cfg.origin,
               "parameters": count_parameters(session.model), "loss": cfg.loss, "temperature": cfg.temperature,
               "alpha": cfg.alpha, "final_eval": final, "teacher_eval": teacher_eval,
               "retention": retention(cfg.task, final, teacher_eval), **info}
    if cfg.task == "classify":
        session.weights.write()  # no checkpoints: the folder takes the final (best) weights now
    session.finish(final, summary, title=f"{cfg.out.name}: distilled from {cfg.teacher.name}")
    write_card(cfg, summary)
    if cfg.as_json:
        print(json.dumps(summary, default=str))
    else:
        report(summary, cfg)
    return summary


def report(summary: dict, cfg: DistillConfig) -> None:
    final, teacher = summary["final_eval"], summary["teacher_eval"]
    metric = "accuracy" if cfg.task == "classify" else "loss"
    if final and teacher:
        print(f"held-out {metric}: student {final[metric]:.4f} | teacher {teacher[metric]:.4f} | retention "
              f"{summary['retention']:.1%} | {summary['step']:,} steps, {summary['tokens_seen']:,} tokens in "
              f"{summary['train_seconds']:.0f} s ({summary['tokens_per_s']:,.0f} tok/s)")
    if summary["interrupted"]:
        print(f"interrupted: checkpoint saved; continue with: slm distill --teacher {cfg.teacher} --data ... --out "
              f"{cfg.out} --resume")
    print(f"model folder: {cfg.out}")


def add_args(p) -> None:
    from slmkit.distill.cli import add_args as add

    add(p)
