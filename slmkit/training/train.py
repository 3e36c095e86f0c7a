"""Verb `train`: a tokenizer and a model from scratch on a corpus, as a pipeline of stages over one TrainConfig.

    open_output -> plan (the recipe's choices) -> tokenizer -> corpus (token memmap, held-out split)
      -> regularisation (passes over the data -> weight decay, dropout) -> model, optimizer, task
      -> Session.fit (slmkit/training/stages.py, around training/fit.py's loop) -> finish (calibration, card)

Checkpoints are atomic and hold optimizer, RNG and data-sampler state, so `--resume` continues the same trajectory:
the run file (train_args.json) is the configuration with every choice the recipe made written in, and a resumed run
is built from it. Under `torchrun` the same command trains data-parallel (DDP).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from slmkit import distributed as dist
from slmkit.data import mlm as encoders
from slmkit.data.corpus import (
    EpochSampler,
    batch_at,
    corpus_bytes,
    epoch_windows,
    expand_paths,
    get_batch,
    load_tokens,
    split_tokens,
    tokenize_to_memmap,
)
from slmkit.files import atomic_write_json
from slmkit.hardware import eval_dtype, pick_device, pick_dtype, precision_name, require_cpp_compiler
from slmkit.infer.evaluate import evaluate_tokens, fit_temperature
from slmkit.model.checkpoint import CHECKPOINT, read_checkpoint_state
from slmkit.model.folder import base_parameter_count, build_model, scale_logits
from slmkit.model.llama import set_dropout
from slmkit.model.presets import PRESETS, build_config, is_encoder
from slmkit.model.tokenizer import byte_tokenizer, load_tokenizer, token_byte_lengths, train_bpe, train_wordpiece
from slmkit.training import recipe
from slmkit.training.config import Budget, TrainConfig
from slmkit.training.fit import EarlyStop
from slmkit.training.losses import causal_lm_loss
from slmkit.training.optim import make_optimizer, set_weight_decay
from slmkit.training.report import write_model_card
from slmkit.training.stages import Session, Task, Weights, cleans_up, fit_config, open_output

# Held-out tokens below which the logits are not calibrated: one number fitted on a few hundred tokens is noise.
MIN_CALIBRATION_TOKENS = 2048
RUN_FILE = "train_args.json"
# What the run file keeps: the choices that shape the run. Output, device, evaluation cadence and the like come from
# each invocation.
SAVED = ("data", "preset", "tokenizer", "vocab_size", "tokenizer_from", "block_size", "batch_size", "grad_accum", "lr",
         "min_lr_ratio", "warmup", "weight_decay", "dropout", "dropout_start", "sampling", "clip", "steps", "tokens",
         "optimizer", "time", "val_fraction", "eval_data", "seed", "set", "text_col", "dtype", "lowercase",
         "auto_overrides", "precision", "replan")


# ----------------------------------------------------------------------------------------------------------------
# Helpers of the verb (unit-tested directly)


def parse_overrides(items: list[str] | None) -> dict:
    """['hidden_size=256', 'rope_theta=1e5'] -> {'hidden_size': 256, 'rope_theta': 100000.0}."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


@dataclass
class Plan:
    """What the recipe chose for this run, with explicit flags winning; the run file saves it, --resume reuses it."""
    preset: str
    model: dict  # the model's config; the vocabulary and special tokens are set once the tokenizer exists
    block: int  # context length
    batch: int  # rows per micro-batch per process
    lr: float
    warmup: int
    optimizer: str
    autocast: torch.dtype | None  # training precision (None: fp32)
    tokenizer: str  # bpe, byte or wordpiece (or reused: TrainConfig.tokenizer_from)
    sampling: str  # epoch (shuffled passes) or random
    auto_overrides: dict  # --preset auto's own config fields
    weight_decay: float = 0.1
    dropout: float = 0.0
    dropout_start: float = recipe.LATE_DROPOUT_START
    passes: float = 0.0  # passes over the training data the budget is planned to make
    replan: list[str] = field(default_factory=list)  # choices to make again at recipe.REPLAN_AT of a time budget

    @property
    def llama(self) -> bool:
        return self.model.get("model_type", "llama") == "llama"

    def by_passes(self, passes: float) -> dict:
        """Weight decay and dropout for PASSES over the data: more the more the budget repeats it (measured on Llama
        decoders; the rest keep 0.1 and no dropout)."""
        if not self.llama:
            return {"weight_decay": 0.1, "dropout": 0.0}
        return {"weight_decay": recipe.weight_decay_for(passes), "dropout": recipe.dropout_for(self.model, passes)}

    def replanned(self, passes: float) -> Plan:
        """The re-plan: the choices still in REPLAN made again for the PASSES the run will really make."""
        picked = self.by_passes(passes)
        return replace(self, replan=[], **{k: picked[k] for k in self.replan})


def refuse_unused(cfg: TrainConfig) -> None:
    """Stage 0: one line for a tokenizer or dropout flag this run would not read, before anything is read."""
    from slmkit.options import refuse_unused as refuse

    values, preset = vars(cfg), PRESETS.get(cfg.preset, {})
    if cfg.tokenizer_from:
        refuse("--tokenizer-from", values, dict.fromkeys(("tokenizer", "vocab_size", "lowercase"),
                                                          "the reused tokenizer is taken as it is"))
    kind = cfg.tokenizer or ("wordpiece" if preset and is_encoder(cfg.preset) else "bpe")
    if kind != "wordpiece":
        refuse(f"a {kind} tokenizer", values, {"lowercase": "it is WordPiece's (--tokenizer wordpiece)"})
    if kind == "byte":
        refuse("--tokenizer byte", values, {"vocab_size": "its vocabulary is the 256 byte values"})
    if preset and is_encoder(cfg.preset):
        refuse(f"--preset {cfg.preset}", values, {"calibrate": "a masked-LM encoder's logits are never calibrated"},
               {"calibrate": True})
    if preset.get("model_type", "llama") != "llama":  # set_dropout reaches slmkit's Llama blocks only
        refuse(f"--preset {cfg.preset}", values, dict.fromkeys(("dropout", "dropout_start"), "its dropout is its "
                                                               "config's own (e.g. --set hidden_dropout_prob=0.2)"))


def plan_run(cfg: TrainConfig, n_bytes: int, dev: str, budget: Budget) -> Plan:
    """Stage 1, before any data is read: --preset auto's choices (recipe.auto_recipe), explicit flags winning. A bad
    --set fails here, before the tokenizer trains."""
    auto = recipe.auto_recipe(n_bytes, dev, budget.seconds, budget.steps, budget.tokens, dtype=cfg.dtype)
    preset = auto["preset"] if cfg.preset == "auto" else cfg.preset
    block = cfg.block_size or auto["block_size"]
    # the recipe's tokens per step hold when only the context is given: --block-size 1024 alone takes 4 rows of 1024,
    # not 16 (4x the tokens per update, a quarter of the updates)
    batch = cfg.batch_size or max(1, auto["batch_size"] * auto["block_size"] // block)
    # --preset auto's own config fields (the untied head, the 3-layer slm-1m) are saved with the run: a resumed run
    # rebuilds the model it checkpointed, whatever auto would pick now
    auto_overrides = cfg.auto_overrides
    if auto_overrides is None:
        auto_overrides = auto["overrides"] if cfg.preset == "auto" else {}
    model = build_config(preset, 512, {**auto_overrides, **parse_overrides(cfg.set)}, block_size=block)
    # A resumed run keeps the precision its start resolved: `auto` rests on a timing (cpu_bf16_fast) that can differ
    # between two processes on a busy machine, and the trajectory must not
    autocast = pick_dtype(cfg.precision or cfg.dtype, dev, model["hidden_size"])
    # Muon for Llama decoders: it beat AdamW on tiny Shakespeare at 200 steps and at 180 s (docs/benchmarks.md).
    # Encoders and GPT-Neo keep AdamW (not measured with Muon); runs saved before --optimizer existed used AdamW.
    llama = model.get("model_type", "llama") == "llama"
    optimizer = cfg.optimizer or ("adamw" if cfg.resume or not llama else "muon")
    return Plan(preset, model, block, batch, cfg.lr or recipe.peak_lr(model["hidden_size"], optimizer),
                cfg.warmup if cfg.warmup is not None else auto["warmup_steps"], optimizer, autocast,
                tokenizer=encoders.pick_tokenizer(cfg.tokenizer, is_encoder(preset), cfg.tokenizer_from),
                sampling=cfg.sampling or "epoch", auto_overrides=auto_overrides)


def plan_regularisation(cfg: TrainConfig, plan: Plan, train_tokens: int, budget: Budget, dev: str) -> Plan:
    """Stage 4, once the data is tokenized: a time budget on a small corpus ends after recipe.MAX_PASSES passes;
    weight decay and dropout follow the passes the budget makes (flags win); what the recipe chose for a time budget
    is chosen again at recipe.REPLAN_AT (one process: under torchrun every rank plans from the same floor, and ranks
    must not decide apart)."""
    step_tokens = plan.batch * plan.block * cfg.grad_accum * dist.world_size()
    cap = recipe.pass_cap(train_tokens, budget.steps, budget.tokens) if plan.llama else None
    if cap:  # measured on Llama decoders, like the weight decay below
        budget.tokens = cap
        vocab = plan.model["vocab_size"]
        if recipe.planned_tokens(plan.model, vocab, plan.block, step_tokens, dev, seconds=budget.seconds) > cap \
                and dist.is_main():
            print(f"schedule: ends after {recipe.MAX_PASSES} passes over the {train_tokens:,} training tokens "
                  f"({cap:,}) if the {budget.seconds:g} s budget lasts that long: more would only memorise a corpus "
                  "this small; set --tokens to train longer")
    passes = recipe.planned_passes(plan.model, plan.block, step_tokens, train_tokens, dev, budget.steps,
                                   budget.tokens, budget.seconds, cfg.dtype) if plan.llama else 0.0
    picked = plan.by_passes(passes)
    replan = cfg.replan
    if replan is None:
        replan = [k for k in picked if getattr(cfg, k) is None] \
            if plan.llama and budget.seconds and dist.world_size() == 1 else []
    return replace(plan, passes=passes, replan=replan,
                   weight_decay=picked["weight_decay"] if cfg.weight_decay is None else cfg.weight_decay,
                   dropout=picked["dropout"] if cfg.dropout is None else cfg.dropout,
                   dropout_start=recipe.LATE_DROPOUT_START if cfg.dropout_start is None else cfg.dropout_start)


def save_run(cfg: TrainConfig, plan: Plan) -> None:
    """The run file: the configuration with the plan written in (what --resume rebuilds the run from)."""
    if dist.is_main():
        run = {k: v for k, v in asdict(cfg).items() if k in SAVED}
        run.update(preset=plan.preset, block_size=plan.block, batch_size=plan.batch, lr=plan.lr, warmup=plan.warmup,
                   vocab_size=plan.model["vocab_size"], optimizer=plan.optimizer,
                   precision=precision_name(plan.autocast),
                   weight_decay=plan.weight_decay, dropout=plan.dropout, dropout_start=plan.dropout_start,
                   replan=plan.replan, tokenizer=plan.tokenizer, sampling=plan.sampling,
                   auto_overrides=plan.auto_overrides)
        atomic_write_json(cfg.out / RUN_FILE, run)


def resumed(cfg: TrainConfig, saved: dict) -> TrainConfig:
    """The configuration a --resume runs: the saved run's choices, this invocation's budgets (which may grow) and
    its output, device and evaluation settings."""
    now = asdict(cfg)
    _check_resume_compatible(saved, now)
    saved = {"dropout_start": 0.0, "sampling": "random", "replan": [], **saved}  # runs saved before these existed
    budgets = {k: now[k] for k in ("steps", "tokens", "time") if now[k] is not None}
    return TrainConfig(**{**now, **{k: v for k, v in saved.items() if k in SAVED}, **budgets})


# ----------------------------------------------------------------------------------------------------------------
# The verb


def main(**options) -> dict:
    """Train a tokenizer and a decoder (or a masked-LM encoder) on DATA and write a Hugging Face model folder to OUT.

    With a held-out split, the folder holds the weights that scored best on it, and training stops once PATIENCE
    evaluations since the best scored over 1% worse than it (0: train to the end of the budget, keep the last
    weights). Then a decoder's logits are calibrated on that split (CALIBRATE: evaluate.fit_temperature, folded into
    the final norm by models.scale_logits).
    Returns a summary dict (parameters, steps, tokens, train_seconds, final_eval, best_step, out).
    """
    return run(TrainConfig.from_options("slm train", **options))


@cleans_up()
def run(cfg: TrainConfig) -> dict:
    """The pipeline of `slm train` over CFG (see the module docstring); returns the run's summary."""
    refuse_unused(cfg)
    dev = pick_device(cfg.device)
    if cfg.compile and dev == "cpu":
        require_cpp_compiler()
    dist.setup(dev)
    saved = open_output(cfg.out, cfg.resume, cfg.overwrite, RUN_FILE, sources=[*cfg.data, *(cfg.eval_data or [])])
    if saved is not None:
        cfg = resumed(cfg, saved)
    budget = cfg.budget(announce=dist.is_main())
    files = expand_paths(cfg.data)
    n_bytes = corpus_bytes(files)
    torch.manual_seed(cfg.seed)
    plan = plan_run(cfg, n_bytes, dev, budget)
    cfg.out.mkdir(parents=True, exist_ok=True)
    tok = get_tokenizer(cfg, plan, files, n_bytes)
    train_tokens, val_tokens, meta = load_corpus(cfg, files, tok, plan.block)
    plan.model.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    if not plan.llama and plan.block > plan.model.get("max_position_embeddings", plan.block):
        raise SystemExit(f"error: --block-size {plan.block} exceeds the preset's max_position_embeddings")
    plan = plan_regularisation(cfg, plan, len(train_tokens), budget, dev)
    session = build_session(cfg, plan, tok, train_tokens, val_tokens, dev)
    if cfg.resume:
        resume_session(session, cfg, plan, budget)
    save_run(cfg, plan)
    session.start_log(cfg.resume)
    announce(session, plan, dev, cfg.grad_accum, len(train_tokens), len(val_tokens))
    loss_fn = session.task.loss_fn
    if cfg.compile:
        # The loss, not just the model: the final norm, LM head and cross-entropy then fuse with the rest (2 CPU
        # cores, 180 s benchmark shape, interleaved A/B: 1.27x eager per step vs 1.18x compiling the model alone;
        # within the host's spread in bench_throughput.py, docs/benchmarks.md). Evaluation keeps the eager module
        # (it would otherwise compile a second, no-grad graph).
        loss_fn = torch.compile(loss_fn)
    hook = ProgressHook(session, cfg, plan, len(train_tokens))
    # at least once per pass over the data: a small corpus on a fast device starts to overfit within minutes
    per_pass = max(1, session.task.batches_per_pass // cfg.grad_accum) if session.keep_best else None
    session.fit(budget, fit_config(cfg, budget, dev, plan.lr, plan.warmup, plan.autocast, per_pass, hook),
                dist.wrap(session.model, dev), loss_fn)
    summary = finish(session, cfg, hook.plan, tok, files, meta, val_tokens, dev)
    dist.teardown()
    return summary


# ----------------------------------------------------------------------------------------------------------------
# The stages


def get_tokenizer(cfg: TrainConfig, plan: Plan, files: list[Path], n_bytes: int):
    """Stage 2: the run's tokenizer, trained on the corpus (rank 0 trains and saves it; the others read that),
    reused from --tokenizer-from, raw bytes, or a resumed run's own."""
    if cfg.resume:
        return load_tokenizer(cfg.out)
    if not dist.is_main():
        dist.barrier()
        return load_tokenizer(cfg.out)
    if cfg.tokenizer_from:
        tok = load_tokenizer(Path(cfg.tokenizer_from))
    elif plan.tokenizer == "byte":
        tok = byte_tokenizer()
    elif plan.tokenizer in ("bpe", "wordpiece"):
        from slmkit.data.corpus import iter_documents

        vocab = cfg.vocab_size or recipe.auto_vocab_size(n_bytes, PRESETS[plan.preset]["hidden_size"])
        print(f"training a {_tokenizer_kind(cfg, plan)} tokenizer ({vocab:,} tokens) on {n_bytes:,} bytes")
        docs = _cap_bytes(iter_documents(files, cfg.text_col), 256 << 20)
        tok = train_bpe(docs, vocab) if plan.tokenizer == "bpe" else train_wordpiece(docs, vocab, cfg.lowercase)
    else:
        raise SystemExit(f"error: unknown --tokenizer {plan.tokenizer!r}; use bpe, byte or wordpiece")
    tok.save_pretrained(cfg.out)
    dist.barrier()
    return tok


def load_corpus(cfg: TrainConfig, files: list[Path], tok, block: int) -> tuple:
    """Stage 3: the corpus as tokens (cached by content hash; rank 0 writes the cache, the others then read it),
    held out from its end or from --eval-data -> (train tokens, held-out tokens, the corpus's meta)."""
    def tokenize(paths: list[Path]) -> tuple:
        if dist.is_main():
            tokenize_to_memmap(paths, tok, text_col=cfg.text_col, replace_errors=cfg.replace_errors)
        dist.barrier()
        bin_path, meta = tokenize_to_memmap(paths, tok, text_col=cfg.text_col, replace_errors=cfg.replace_errors)
        return load_tokens(bin_path, meta), meta

    all_tokens, meta = tokenize(files)
    if not cfg.eval_data:
        return *split_tokens(all_tokens, cfg.val_fraction, block), meta
    train_tokens, _ = split_tokens(all_tokens, 0.0, block)  # a separate held-out text: all of --data trains
    val_tokens, _ = tokenize(expand_paths(cfg.eval_data))
    if len(val_tokens) <= block + 1:
        raise SystemExit(f"error: --eval-data {' '.join(cfg.eval_data)} has {len(val_tokens):,} tokens, too few "
                         f"for --block-size {block}; give more held-out text or lower --block-size")
    return train_tokens, val_tokens, meta


def build_session(cfg: TrainConfig, plan: Plan, tok, train_tokens, val_tokens, dev: str) -> Session:
    """Stage 5: the model, its optimizer and the task (batches, loss, held-out evaluation) in a Session."""
    model = build_model(plan.model).to(dev)
    set_dropout(model, plan.dropout)
    # Muon's Newton-Schulz on a CPU in the run's precision: fp32 (--dtype fp32, or a model too narrow for bf16) must
    # not rest on cpu_bf16_fast's timing, or two runs of one seed on a busy machine could train different weights
    ns_bf16 = plan.autocast == torch.bfloat16 if dev == "cpu" else None
    optimizer = make_optimizer(model, plan.lr, plan.weight_decay, dev, plan.optimizer, ns_bf16=ns_bf16)
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * dist.rank())  # random windows; encoders' masks
    # shuffled passes: one seed on every rank, each takes its slice of the global batch
    windows = EpochSampler(lambda epoch: epoch_windows(len(train_tokens), plan.block, cfg.seed, epoch), dist.rank(),
                           dist.world_size()) if plan.sampling == "epoch" else None
    block, bsz, token_bytes = plan.block, plan.batch, token_byte_lengths(tok)
    next_batch = (lambda: batch_at(train_tokens, windows.take(bsz), block, dev)) if windows else (
        lambda: get_batch(train_tokens, bsz, block, gen, dev))
    loss_fn, eval_fn = causal_lm_loss, evaluate_tokens
    if is_encoder(plan.model):  # masked-LM pretraining: same loop, other batches, loss and evaluation
        next_batch, loss_fn, eval_fn = encoders.mlm_task(tok, train_tokens, bsz, block, gen, dev,
                                                         windows.take if windows else None)
    eval_autocast = eval_dtype(plan.autocast, dev)  # held-out evaluations: fp32 on CPU, as `slm eval` scores

    def evaluate(m, n_tokens: int) -> dict:
        return eval_fn(m, val_tokens, block, token_bytes, max_windows=max(1, n_tokens // block), device=dev,
                       autocast_dtype=eval_autocast)

    task = Task(next_batch, loss_fn, evaluate if len(val_tokens) else None,  # --val-fraction 0: no evaluation
                len(train_tokens) // (bsz * block * dist.world_size()), gen, windows)
    return Session(cfg.out, optimizer, task, Weights(model, cfg.out), EarlyStop(cfg.patience),
                   eval_tokens=cfg.eval_tokens, extra_state={"config": _comparable(plan.model)})


def resume_session(session: Session, cfg: TrainConfig, plan: Plan, budget: Budget) -> None:
    """--resume: the checkpoint must be of the architecture this run builds; then model, optimizer, sampler and
    early stopping continue from it."""
    if read_checkpoint_state(cfg.out / CHECKPOINT).get("config") != _comparable(plan.model):
        raise SystemExit(f"error: --resume: the checkpoint in {cfg.out} is a different architecture than this run "
                         "builds; resume with the original settings or start a new --out")
    session.resume()
    set_weight_decay(session.optimizer, plan.weight_decay)  # the run file's: a re-plan may postdate the checkpoint
    st = session.state
    if budget.progress(st.step, st.tokens, st.train_seconds) >= 1 and dist.is_main():
        print(f"--resume: {cfg.out} already reached this budget (step {st.step:,}, {st.tokens:,} tokens, "
              f"{st.train_seconds:.0f} s of training); to train further raise "
              + (f"--tokens (a --time budget ends after {recipe.MAX_PASSES} passes here)"
                 if plan.llama and not (cfg.steps or cfg.tokens) else "--time, --steps or --tokens"))


def announce(session: Session, plan: Plan, dev: str, grad_accum: int, n_train: int, n_val: int) -> None:
    """The start line: what the recipe chose."""
    if not dist.is_main():
        return
    n_params = base_parameter_count(session.model)  # encoders: the published base count (no MLM head), as slm info
    drop = f"dropout {plan.dropout:g} from {plan.dropout_start:.0%} | " if plan.dropout else ""
    print(f"model: {plan.preset} | {n_params:,} parameters | vocab {plan.model['vocab_size']:,} | block {plan.block} | "
          f"batch {plan.batch}x{dist.world_size()}x{grad_accum} | lr {plan.lr:g} | "
          f"wd {plan.weight_decay:g} | {drop}{dev} {precision_name(plan.autocast)} | data {n_train:,} train / "
          f"{n_val:,} val tokens")


class ProgressHook:
    """What a run changes as its schedule progresses (FitConfig.on_progress): the re-plan at recipe.REPLAN_AT of a
    time budget, and late dropout."""

    def __init__(self, session: Session, cfg: TrainConfig, plan: Plan, train_tokens: int):
        self.session, self.cfg, self.plan, self.train_tokens = session, cfg, plan, train_tokens
        self.dropout_now = plan.dropout  # what the blocks have: build_session set it

    def __call__(self, progress: float) -> None:
        if self.plan.replan and progress >= recipe.REPLAN_AT:
            self.replan(progress)
        # Late dropout (Liu et al., 2023): none while the model still underfits, --dropout from --dropout-start of the
        # budget on, when the run starts repeating its data. Set when it changes: a compiled loss recompiles once.
        p = self.plan.dropout if progress >= self.plan.dropout_start else 0.0
        if p != self.dropout_now:
            set_dropout(self.session.model, p)
            self.dropout_now = p

    def replan(self, progress: float) -> None:
        """The passes this run will make at the speed it has shown (tokens so far over the budget's progress: a
        --tokens cap included), and what the recipe picks for them; flags the user set are not re-planned."""
        made = self.session.state.tokens / progress / self.train_tokens
        before, self.plan = self.plan, self.plan.replanned(made)
        set_weight_decay(self.session.optimizer, self.plan.weight_decay)
        save_run(self.cfg, self.plan)
        changed = [f"{k.replace('_', ' ')} {getattr(before, k):g} -> {getattr(self.plan, k):g}" for k in before.replan
                   if getattr(self.plan, k) != getattr(before, k)]
        if changed:
            print(f"\nre-planned at {progress:.0%} of the budget from this run's speed: {made:.1f} passes over the "
                  f"data, not the {before.passes:.1f} planned: {', '.join(changed)}", file=sys.stderr)


def calibrate(session: Session, cfg: TrainConfig, plan: Plan, val_tokens, dev: str) -> float:
    """A decoder's logits divided by the temperature that fits the held-out split best, folded into the final norm
    (written to the folder; the checkpoint keeps the uncalibrated weights a --resume continues from) -> it, or 1."""
    model = session.model
    temp, before, after = fit_temperature(model, val_tokens, plan.block, dev, eval_dtype(plan.autocast, dev))
    if not (after < before - 1e-4 and scale_logits(model, 1.0 / temp)):
        return 1.0
    session.weights.write()
    session.log({"kind": "calibration", "temperature": temp, "loss_before": before, "loss_after": after})
    print(f"calibrated: logits / {temp:g} (held-out loss {before:.4f} -> {after:.4f}, fitted on that split; "
          "--no-calibrate to keep them as trained)")
    return temp


def finish(session: Session, cfg: TrainConfig, plan: Plan, tok, files, meta: dict, val_tokens, dev: str) -> dict:
    """Stage 7: calibration, the final held-out evaluation, generation config, loss plot, summary and model card."""
    summary = {**session.summary(), "preset": plan.preset, "parameters": base_parameter_count(session.model),
               "final_eval": {}, "logit_temperature": 1.0}
    if not dist.is_main():
        return summary
    if cfg.calibrate and len(val_tokens) >= MIN_CALIBRATION_TOKENS and not is_encoder(plan.model):
        summary["logit_temperature"] = calibrate(session, cfg, plan, val_tokens, dev)
    final = session.task.evaluate(session.model, 4_000_000) if session.task.evaluate else {}
    summary["final_eval"] = final
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
           "do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "max_new_tokens": 200}
    atomic_write_json(cfg.out / "generation_config.json", gen)
    m = plan.model
    card = {**summary, "model_type": m.get("model_type", "llama"), "layers": m.get("num_hidden_layers",
            m.get("num_layers")), "hidden_size": m["hidden_size"], "heads": m.get("num_attention_heads",
            m.get("num_heads")), "block_size": plan.block, "tokenizer": _tokenizer_kind(cfg, plan),
            "vocab_size": m["vocab_size"], "data": [str(f) for f in files], "corpus_tokens": int(meta["tokens"]),
            "corpus_bytes": meta["bytes"],
            "val_fraction": len(val_tokens) / int(meta["tokens"]) if not cfg.eval_data else 0.0,
            "eval_data": cfg.eval_data, "batch_size": plan.batch * dist.world_size(), "grad_accum": cfg.grad_accum,
            "lr": plan.lr, "weight_decay": plan.weight_decay, "dropout": plan.dropout,
            "dropout_start": plan.dropout_start, "sampling": plan.sampling, "device": dev,
            "dtype": precision_name(plan.autocast)}
    session.finish(final, card, title=f"{cfg.out.name}: {plan.preset}")
    write_model_card(cfg.out, card)
    st = session.state
    if final:
        print(f"held-out: loss {final['loss']:.4f} | perplexity {final['perplexity']:.2f} | bits/byte "
              f"{final['bits_per_byte']:.4f} | {st.step:,} steps, {st.tokens:,} tokens in {st.train_seconds:.0f} s "
              f"({summary['tokens_per_s']:,.0f} tok/s)")
    if summary["interrupted"]:
        print(f"interrupted: checkpoint saved; continue with: slm train --data ... --out {cfg.out} --resume")
    print(f"model folder: {cfg.out}")
    return summary


def _comparable(cfg: dict) -> dict:
    return json.loads(json.dumps(cfg))


def _check_resume_compatible(saved: dict, now: dict) -> None:
    if now["preset"] not in ("auto", saved.get("preset")):
        raise SystemExit(f"error: --resume: preset {now['preset']!r} differs from the saved run's "
                         f"{saved.get('preset')!r}; a different architecture cannot resume this checkpoint")
    for key in ("tokenizer", "vocab_size", "block_size", "batch_size", "set", "optimizer"):
        if now.get(key) not in (None, [], saved.get(key)):
            raise SystemExit(f"error: --resume: --{key.replace('_', '-')} {now[key]} differs from the saved run "
                             f"({saved.get(key)}); drop the flag or start a new --out")


def _tokenizer_kind(cfg: TrainConfig, plan: Plan) -> str:
    return f"from {cfg.tokenizer_from}" if cfg.tokenizer_from else (
        {"bpe": "byte-level BPE", "wordpiece": "WordPiece"}.get(plan.tokenizer, "bytes"))


def _cap_bytes(texts, limit: int):
    """BPE statistics converge long before a huge corpus ends: train on its first LIMIT bytes."""
    seen = 0
    for t in texts:
        yield t
        seen += len(t)
        if seen >= limit:
            return



def add_args(p) -> None:
    p.add_argument("--data", nargs="+", required=True, help="training text: .txt/.md files, directories, globs, "
                   "JSONL (text field), CSV/Parquet (text column)")
    p.add_argument("--out", type=Path, required=True, help="output model folder")
    p.add_argument("--preset", default="auto", help="model size: auto (default: sized for corpus and budget), "
                   "slm-tiny, slm-1m, slm-3m, slm-7m, slm-15m, slm-30m, slm-65m, slm-125m, gpt-neo-125m; encoders "
                   "(masked LM): bert-tiny, bert-mini, bert-small, bert-medium, bert-base, distilbert, mobilebert")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field, e.g. "
                   "--set num_hidden_layers=6 (repeatable)")
    g = p.add_argument_group("budget (the first one reached ends training; default 5 minutes)")
    g.add_argument("--time", help=f"training time: 180, 180s, 3m, 1h (Llama decoders: or {recipe.MAX_PASSES} passes "
                   "over the data, if sooner; a small corpus is only memorised beyond that)")
    g.add_argument("--steps", help="optimizer steps, e.g. 2000")
    g.add_argument("--tokens", help="training tokens, e.g. 5M")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", choices=["bpe", "byte", "wordpiece"], default=None,
                   help="bpe: byte-level BPE trained on the corpus (default for decoders); byte: 256 bytes + "
                   "specials; wordpiece: BERT WordPiece (default for encoders)")
    g.add_argument("--lowercase", action="store_true", help="WordPiece: lowercase and strip accents (uncased)")
    g.add_argument("--vocab-size", type=int, help="BPE vocabulary (default: sized for the corpus and model)")
    g.add_argument("--tokenizer-from", type=Path, help="reuse the tokenizer of this model folder")
    g = p.add_argument_group("optimisation (defaults come from --preset auto)")
    g.add_argument("--block-size", type=int, help="context length in tokens (default: the recipe's, 256 on a CPU up "
                   "to 256 dims)")
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch per process (default: the recipe's "
                   "tokens per step, e.g. 4,096 for 128 dims, over the block size)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak (default 0.1)")
    g.add_argument("--warmup", type=int, help="warmup steps")
    g.add_argument("--optimizer", choices=["adamw", "muon"], help="muon (default for Llama decoders): Muon on the "
                   "blocks' weight matrices, AdamW on embeddings and norms; adamw (default for encoders, GPT-Neo)")
    g.add_argument("--weight-decay", type=float, help="weight decay on matrices (default for Llama decoders: 0.1 x "
                   "the passes the budget makes over the data, between 0.1 and 1.0, chosen again at 10%% of a time "
                   "budget from the run's speed; others 0.1)")
    g.add_argument("--dropout", type=float, default=None, help="residual dropout while training, from "
                   "--dropout-start on (default: 0.1 for Llama decoders 128+ dims wide whose budget makes 6+ passes "
                   "over the data, else 0; re-planned with the weight decay)")
    g.add_argument("--dropout-start", type=float, default=None, help="fraction of the budget (its schedule's "
                   "progress) before which dropout stays off: late dropout (default: 0.4; 0: from the first step)")
    g.add_argument("--sampling", choices=["epoch", "random"], default=None, help="epoch (default): shuffled passes "
                   "over the data, every window once a pass at a moving phase; random: independent random windows, "
                   "nanoGPT's way (runs saved before epoch sampling resume with it)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip, 0 to disable (default: 1.0)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on GPUs that support it and, for models 128+ dims wide, on CPUs "
                        "whose bf16 products measure 3x+ fp32's (AMX, Zen 5); fp32 otherwise (bf16 on a CPU "
                        "without bf16 units warns: it runs emulated, ~15x slower)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
    g.add_argument("--compile", action="store_true", help="torch.compile the model and its loss (compile time counts "
                   "as training: ~20-30 s on 2 CPU cores, seconds once inductor's cache holds the graph; on CPU it "
                   "needs a C++ compiler such as g++)")
    g.add_argument("--seed", type=int, default=1337, help="random seed (default: 1337)")
    g = p.add_argument_group("data, evaluation and checkpoints")
    g.add_argument("--val-fraction", type=float, help="held-out share, taken from the end of --data (default: 1%%, "
                   "at least 8 blocks, at most 10%%; 0 = none)")
    g.add_argument("--eval-data", nargs="+", metavar="PATH", help="held-out text in separate files (same formats as "
                   "--data); then nothing is held out of --data")
    g.add_argument("--text-col", default="text", help="text field/column for JSONL, CSV, Parquet (default: text)")
    g.add_argument("--replace-errors", action="store_true", help="replace undecodable bytes instead of failing")
    g.add_argument("--eval-every", help="evaluate every N steps (a number) or every duration (30s, 2m)")
    g.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens per periodic evaluation")
    g.add_argument("--patience", type=int, default=3, help="stop once this many evaluations since the best held-out "
                   "loss scored over 1%% worse than it (overfitting); the folder keeps the best weights (default: 3; "
                   "0 = run the whole budget, keep the last weights). Evaluations come at least once per pass over "
                   "the data")
    g.add_argument("--no-calibrate", dest="calibrate", action="store_false", help="keep the logits as trained; "
                   "by default a decoder's are divided by the temperature (1-1.5) that fits the held-out split best, "
                   f"folded into the final norm's weight (skipped under {MIN_CALIBRATION_TOKENS} held-out tokens)")
    g.add_argument("--checkpoint-every", default="2m", help="checkpoint interval in training time (default: 2m)")
    g.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    g.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
