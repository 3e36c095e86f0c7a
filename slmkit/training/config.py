"""The typed configuration of a training run: one dataclass per recipe, every field documented, checked when built.

    RunConfig        what every recipe shares: output, budget, optimisation, held-out evaluation, device
      TrainConfig    slm train: a tokenizer and a model from scratch      (slmkit/training/train.py)
      TuneConfig     slm finetune --task causal|sft, full or LoRA         (slmkit/training/finetune.py)
      ClassifyConfig slm finetune --task classify                         (slmkit/training/classify.py)

A verb turns its flags into one of these (`TrainConfig(**flags)`) and hands it to the recipe's `run`. A bad value
is one line naming the flag, raised while the config is built, before anything is read or written. Fields left at
None are the recipe's to choose (`--preset auto`, a task's own default); what it chose is saved with the run, so
`--resume` rebuilds the same run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from slmkit.options import check_numbers, parse_count, parse_duration
from slmkit.training.fit import Budget
from slmkit.training.recipe import DEFAULT_SECONDS


@dataclass(kw_only=True)
class RunConfig:
    out: Path  # the output folder (a model folder; an adapter folder for LoRA runs)
    # --- budget: the first one reached ends training (none given: DEFAULT_SECONDS)
    time: float | str | None = None  # seconds of training: 180, '180s', '3m', '1h'
    steps: int | str | None = None  # optimizer steps: 2000, '2k'
    tokens: int | str | None = None  # training tokens: '5M'
    # --- optimisation (None: the recipe's choice)
    lr: float | None = None  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak (cosine after the warmup)
    warmup: int | None = None  # warmup steps
    weight_decay: float | None = None  # on weight matrices only
    clip: float = 1.0  # gradient-norm clip, 0 = none
    batch_size: int | None = None  # sequences (rows) per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    block_size: int | None = None  # context length in tokens
    sampling: str | None = None  # epoch: shuffled passes (the default); random: independent random draws
    # --- held-out evaluation and early stopping
    val_fraction: float | None = None  # share held out from the end of the data
    eval_every: str | int | None = None  # N steps (a number) or a duration ('30s'); None: the recipe's
    eval_tokens: int = 65536  # held-out tokens per periodic evaluation
    patience: int | None = 3  # evaluations over 1% worse than the best before stopping; 0 = run the whole budget
    # --- the run
    checkpoint_every: str | None = "2m"  # checkpoint interval in training time; None: no checkpoints
    dtype: str = "auto"  # auto, fp32, bf16, fp16 (hardware.pick_dtype)
    device: str = "auto"  # auto, cpu, cuda, cuda:1 ...
    seed: int = 1337
    resume: bool = False  # continue the run saved in OUT
    overwrite: bool = False  # replace a model already in OUT
    progress: bool = True  # progress bar
    text_col: str = "text"  # text field or column of JSONL, CSV, Parquet
    replace_errors: bool = False  # replace undecodable bytes instead of failing

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.time = parse_duration(self.time)
        self.steps, self.tokens = parse_count(self.steps), parse_count(self.tokens)
        check_numbers(vars(self))
        if self.sampling not in (None, "epoch", "random"):
            raise SystemExit(f"error: --sampling {self.sampling!r}: use epoch (shuffled passes) or random")

    def budget(self, announce: bool = True) -> Budget:
        """The run's Budget; none given: DEFAULT_SECONDS of training."""
        budget = Budget(self.steps, self.tokens, self.time)
        if not (budget.steps or budget.tokens or budget.seconds):
            budget.seconds = DEFAULT_SECONDS
            if announce:
                print(f"no budget given: training for {budget.seconds:.0f} s (set --time, --steps or --tokens)")
        return budget

    def eval_schedule(self, budget: Budget) -> dict:
        """FitConfig's evaluation fields from --eval-every: every N steps, or every duration (default: an eighth
        of a time budget, at least 10 s)."""
        every = self.eval_every
        if every is not None and str(every).isdigit():
            return {"eval_every_steps": int(every)}
        return {"eval_every_s": parse_duration(every) if every else max(10.0, (budget.seconds or 300.0) / 8)}

    @classmethod
    def from_options(cls, what: str, **options):
        """The config from a verb's keyword options; an option it has no field for is one line naming the flag it
        came from and WHAT refuses it (e.g. '--task classify')."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise SystemExit(f"error: {', '.join('--' + k.replace('_', '-') for k in unknown)} cannot be used with "
                             f"{what}")
        return cls(**options)


@dataclass(kw_only=True)
class TrainConfig(RunConfig):
    data: list[str]  # training text: files, directories, globs, JSONL/CSV/Parquet
    preset: str = "auto"  # a preset name, or auto: sized for the corpus and the budget
    set: list[str] = field(default_factory=list)  # KEY=VALUE config overrides
    tokenizer: str | None = None  # bpe, byte or wordpiece (default: bpe for decoders, wordpiece for encoders)
    vocab_size: int | None = None  # BPE/WordPiece vocabulary (default: sized for the corpus and the model)
    tokenizer_from: str | None = None  # reuse the tokenizer of this model folder
    lowercase: bool = False  # WordPiece: uncased
    optimizer: str | None = None  # muon (Llama decoders' default) or adamw
    dropout: float | None = None  # residual dropout from dropout_start on (default: by the passes planned)
    dropout_start: float | None = None  # fraction of the budget before dropout starts (late dropout)
    eval_data: list[str] | None = None  # held-out text in separate files (then nothing is held out of DATA)
    compile: bool = False  # torch.compile the model and its loss
    calibrate: bool = True  # fit the logits' temperature on the held-out split
    # --- what a started run resolved, saved with it for --resume (not flags)
    auto_overrides: dict | None = None  # --preset auto's own config fields
    precision: str | None = None  # what --dtype resolved to: fp32, bf16, fp16
    replan: list[str] | None = None  # recipe choices still to be re-planned from the run's own speed

    def __post_init__(self) -> None:
        super().__post_init__()
        self.data = [str(d) for d in self.data]
        self.eval_data = [str(d) for d in self.eval_data] if self.eval_data else None
        self.tokenizer_from = str(self.tokenizer_from) if self.tokenizer_from else None
        self.set = list(self.set or [])
        if self.eval_data and self.val_fraction is not None:
            raise SystemExit("error: give --eval-data or --val-fraction, not both (--eval-data holds nothing out of "
                             "--data)")


@dataclass(kw_only=True)
class LoraConfig:
    """Low-rank adapters (peft) instead of every weight."""
    r: int = 8  # rank
    alpha: float = 16.0  # scale numerator (the update is scaled by alpha / r)
    dropout: float = 0.05  # dropout on the adapter's input
    targets: list[str] | None = None  # module names; None: the recipe's (all linear layers, or attention's)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # the flag's form: q_proj,v_proj
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        check_numbers({"lora_r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout})


@dataclass(kw_only=True)
class TuneConfig(RunConfig):
    model_dir: Path  # the model folder to fine-tune
    data: list[str]
    task: str = "causal"  # causal (continued pretraining) or sft (chat, loss on assistant tokens)
    lora: LoraConfig | None = None  # None: full fine-tuning
    packing: bool = False  # sft: pack conversations end to end instead of padding them
    skip_bad_lines: bool = False  # skip malformed JSONL rows (with a warning)
    val_fraction: float | None = 0.1
    warmup: int | None = 10
    weight_decay: float | None = 0.0
    batch_size: int | None = 8
    sampling: str | None = "epoch"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.model_dir, self.data = Path(self.model_dir), [str(d) for d in self.data]
        if self.task not in ("causal", "sft"):
            raise SystemExit(f"error: unknown --task {self.task!r}; use causal, sft or classify")


@dataclass(kw_only=True)
class ClassifyConfig(RunConfig):
    model_dir: Path  # the encoder (or any model folder) to fine-tune as a sequence classifier
    data: list[Path]  # labelled rows: CSV, TSV, JSONL or Parquet
    label_col: str = "label"
    eval_data: Path | None = None  # held-out rows (default: a stratified VAL_FRACTION split of DATA)
    lora: LoraConfig | None = None  # None: full fine-tuning; LoRA trains the classification head in full
    epochs: float = 3.0  # passes over the training rows (STEPS or TIME may end it sooner)
    max_length: int | None = 128  # tokens per text; longer texts are cut
    batch_size: int | None = 16
    val_fraction: float | None = 0.1
    weight_decay: float | None = 0.01
    checkpoint_every: str | None = None  # minutes-long runs: no checkpoints, no --resume

    def __post_init__(self) -> None:
        super().__post_init__()
        self.model_dir = Path(self.model_dir)
        self.data = [Path(d) for d in (self.data if isinstance(self.data, (list, tuple)) else [self.data])]
        self.eval_data = Path(self.eval_data) if self.eval_data is not None else None
