"""Verb `finetune`: specialize an existing model folder — continued pretraining or chat SFT, full or LoRA.

    model folder + tokenizer -> task (raw text: token memmap | chat JSONL: ids + assistant-only labels)
      -> model (full: every weight | --lora: peft adapters on the linear layers) -> Session.fit -> folder

- `--task causal`: next-token loss on raw text, read and tokenized exactly as `slm train` does (data/corpus.py), with
  the model's own tokenizer.
- `--task sft`: chat rows rendered with the model's chat template (ChatML when it has none), loss on assistant
  tokens only (data/chat.py); `--packing` concatenates conversations instead of padding them.
- `--task classify`: a sequence classifier (training/classify.py; see `slm finetune --task classify`).

Full fine-tuning runs plain Llama models on slmkit's fast module and writes a model folder. LoRA runs on
transformers' module (AutoModelForCausalLM), so the adapter peft saves targets the standard layer names (q_proj,
gate_proj …) and opens with peft anywhere; the adapter folder records its base (path + weight fingerprint) and
`slm merge` folds it in. Checkpoints of a LoRA run hold only the adapter and its optimizer state. Budgets,
progress, evaluation, early stopping, checkpoints, `--resume`, metrics.jsonl and loss.png are the stages `slm train`
uses (training/stages.py).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from slmkit.data.corpus import (
    EpochSampler,
    batch_at,
    epoch_rows,
    epoch_windows,
    expand_paths,
    get_batch,
    load_tokens,
    split_tokens,
    tokenize_to_memmap,
)
from slmkit.files import atomic_write_json
from slmkit.hardware import eval_dtype, pick_device, pick_dtype, precision_name
from slmkit.infer.evaluate import evaluate_tokens
from slmkit.infer.load import load_model, read_config
from slmkit.model.adapters import is_adapter_folder, require_peft, weights_fingerprint
from slmkit.model.checkpoint import CHECKPOINT, read_checkpoint_state
from slmkit.model.folder import count_parameters
from slmkit.model.tokenizer import CHATML_TEMPLATE, load_tokenizer, token_byte_lengths
from slmkit.training.config import ClassifyConfig, LoraConfig, TuneConfig
from slmkit.training.fit import EarlyStop
from slmkit.training.losses import causal_lm_loss, sft_loss
from slmkit.training.optim import make_optimizer
from slmkit.training.stages import Session, Task, Weights, add_lora, cleans_up, fit_config, open_output

DEFAULT_LR = {"full": 1e-4, "lora": 1e-3}
RUN_FILE = "finetune_args.json"
# Settings a resumed run must share with the saved one (everything else comes from the saved run, budgets may grow).
SAME_ON_RESUME = ("model_dir", "task", "lora")
CLASSIFY_ONLY = ("label_col", "eval_data", "epochs", "max_length")
# What one of causal and sft does not read: given, each is refused in one line rather than dropped.
NOT_FOR_TASK = {"causal": {"packing": "raw text is already cut into full windows (--packing is sft's)"},
                "sft": {"text_col": "chat rows are read from their messages (or prompt/response) fields",
                        "replace_errors": "chat JSONL is read as UTF-8; re-encode the file"}}


# ----------------------------------------------------------------------------------------------------------------
# The verb: flags -> the configuration of a task


def main(model_dir: Path, data: list[str], out: Path, task: str = "causal", lora: bool = False, **options) -> dict:
    """Fine-tune the model in MODEL_DIR on DATA and write the result to OUT: a model folder, or with --lora an
    adapter folder (merge it with `slm merge`). With a held-out split, OUT keeps the weights that scored best on it,
    and training stops once PATIENCE (default 3) evaluations since the best scored over 1% worse (0: run the whole
    budget, keep the last weights). Returns a summary dict."""
    options = {k: v for k, v in options.items() if v is not None}  # None: the task's own default
    adapters = {k: options.pop(f"lora_{k}") for k in ("r", "alpha", "dropout", "targets") if f"lora_{k}" in options}
    if adapters and not lora:
        raise SystemExit(f"error: --lora-{next(iter(adapters))} does not apply without --lora: it shapes the "
                         "adapters; add --lora or drop it")
    lora_cfg = LoraConfig(**adapters) if lora else None
    from slmkit.model.folder import refuse_quantized

    refuse_quantized(model_dir, read_config(model_dir))  # before the data is read: the folder is the first question
    common = dict(model_dir=model_dir, data=data, out=out, lora=lora_cfg)
    if task == "classify":
        from slmkit.training import classify

        return classify.run(ClassifyConfig.from_options("--task classify", **common, **options))
    given = [k for k in CLASSIFY_ONLY if k in options]
    if given:
        raise SystemExit(f"error: {', '.join('--' + k.replace('_', '-') for k in given)} are for --task classify; "
                         "causal and sft hold out the end of --data (--val-fraction) and use --block-size")
    from slmkit.options import defaults_of, refuse_unused

    refuse_unused(f"--task {task}", options, NOT_FOR_TASK.get(task, {}), defaults_of(TuneConfig))
    return run(TuneConfig.from_options(f"--task {task}", task=task, **common, **options))


@cleans_up()
def run(cfg: TuneConfig) -> dict:
    """The pipeline of `slm finetune --task causal|sft` over CFG; returns the run's summary."""
    hf_cfg = check_model_folder(cfg.model_dir, cfg.out)
    saved = open_output(cfg.out, cfg.resume, cfg.overwrite, RUN_FILE, holds=("config.json", "adapter_config.json"),
                        clear=True, sources=[cfg.model_dir, *cfg.data])
    if saved is not None:
        cfg = resumed(cfg, saved)
    budget = cfg.budget()
    dev = pick_device(cfg.device)
    autocast = pick_dtype(cfg.dtype, dev, hf_cfg.get("hidden_size") or hf_cfg.get("n_embd"))
    method = "lora" if cfg.lora else "full"
    lr = cfg.lr or DEFAULT_LR[method]
    context = int(hf_cfg.get("max_position_embeddings") or hf_cfg.get("n_positions") or 2048)
    block = cfg.block_size or min(512, context)
    if block > context:
        raise SystemExit(f"error: --block-size {block} exceeds the model's context ({context} tokens)")
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.model_dir)
    make_task = causal_task if cfg.task == "causal" else sft_task
    task = make_task(cfg, expand_paths(cfg.data), tok, block, dev, eval_dtype(autocast, dev))  # all checks first
    weights = tuned_model(cfg)
    weights.model.to(dev)
    optimizer = make_optimizer(weights.model, lr, cfg.weight_decay, dev)
    fingerprint = (weights.adapter or {}).get("base_fingerprint")
    session = Session(cfg.out, optimizer, task, weights, EarlyStop(cfg.patience), eval_tokens=cfg.eval_tokens,
                      extra_state={"base_fingerprint": fingerprint})
    if cfg.resume:
        if read_checkpoint_state(cfg.out / CHECKPOINT).get("base_fingerprint") not in (None, fingerprint):
            raise SystemExit(f"error: --resume: the base model {cfg.model_dir} has changed since this adapter was "
                             "trained; restore it or start a new --out")
        session.resume()
    start_folder(session, cfg, tok, block, lr)
    n_params = count_parameters(weights.model)
    n_train = sum(p.numel() for p in weights.model.parameters() if p.requires_grad)
    print(f"finetune ({cfg.task}, {method}): {cfg.model_dir.name} | {n_params:,} parameters, {n_train:,} trainable | "
          f"block {block} | batch {cfg.batch_size}x{cfg.grad_accum} | lr {lr:g} | {dev} {precision_name(autocast)} | "
          f"{task.note}")
    per_pass = max(1, task.batches_per_pass // cfg.grad_accum) if session.keep_best else None  # at least once a pass
    session.fit(budget, fit_config(cfg, budget, dev, lr, cfg.warmup, autocast, per_pass))
    final = task.evaluate(weights.model, task.final_tokens) if task.evaluate else {}
    summary = {**session.summary(), "task": cfg.task, "method": method, "base_model": str(cfg.model_dir),
               "parameters": n_params, "trainable_parameters": n_train, "final_eval": final, "lr": lr,
               "block_size": block, "sampling": cfg.sampling}
    session.finish(final, summary, title=f"{cfg.out.name}: {cfg.task} ({method})")
    report(summary, cfg)
    return summary


def check_model_folder(model_dir: Path, out: Path) -> dict:
    """MODEL_DIR's config, after the one-line errors for what cannot be fine-tuned."""
    if model_dir.is_file():
        raise SystemExit(f"error: {model_dir} is a file; import it as a model folder first: slm import {model_dir} "
                         "--out DIR")
    if is_adapter_folder(model_dir):
        raise SystemExit(f"error: {model_dir} is a LoRA adapter; merge it first (slm merge {model_dir} --out DIR) "
                         "and fine-tune the merged folder")
    hf_cfg = read_config(model_dir)  # one-line error when it is not a model folder
    if out.resolve() == model_dir.resolve():
        raise SystemExit("error: --out must differ from the model folder being fine-tuned")
    return hf_cfg


def run_file(cfg: TuneConfig) -> dict:
    """The run file's contents (its keys predate the typed configuration: --resume reads older ones too)."""
    lora = cfg.lora or LoraConfig()
    run = {k: v for k, v in asdict(cfg).items() if k in (
        "data", "task", "packing", "sampling", "block_size", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup",
        "weight_decay", "clip", "steps", "tokens", "time", "val_fraction", "seed", "text_col", "dtype")}
    return {"model_dir": str(cfg.model_dir.resolve()), **run, "lora": cfg.lora is not None, "lora_r": lora.r,
            "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "lora_targets": lora.targets}


def resumed(cfg: TuneConfig, saved: dict) -> TuneConfig:
    """The configuration a --resume runs: the saved run's (settings that shape the run must match), this
    invocation's budgets, which may grow, and its output and evaluation settings."""
    now = run_file(cfg)
    for key in SAME_ON_RESUME:
        if saved.get(key) != now[key]:
            raise SystemExit(f"error: --resume: {key} {now[key]!r} differs from the saved run's {saved.get(key)!r}; "
                             "resume with the original settings or start a new --out")
    saved = {"sampling": "random", **saved}  # runs saved before shuffled passes drew at random
    lora = LoraConfig(r=saved["lora_r"], alpha=saved["lora_alpha"], dropout=saved["lora_dropout"],
                      targets=saved["lora_targets"]) if saved["lora"] else None
    kept = {k: v for k, v in saved.items() if k in TuneConfig.__dataclass_fields__ and k != "model_dir"}
    budgets = {k: getattr(cfg, k) for k in ("steps", "tokens", "time") if getattr(cfg, k) is not None}
    return TuneConfig(**{**{f: getattr(cfg, f) for f in TuneConfig.__dataclass_fields__}, **kept, **budgets,
                         "lora": lora})


def tuned_model(cfg: TuneConfig) -> Weights:
    """Every weight on slmkit's fast module (plain Llama), or LoRA adapters on transformers' module."""
    if cfg.lora is None:
        return Weights(load_model(cfg.model_dir), cfg.out)
    model, fingerprint = lora_model(cfg.model_dir, cfg.lora, cfg.seed)
    record = {"base_model": str(cfg.model_dir.resolve()), "base_fingerprint": fingerprint, "task": cfg.task,
              "created_by": "slm finetune --lora"}
    return Weights(model, cfg.out, adapter=record)


def lora_model(base_dir: Path, lora: LoraConfig, seed: int):
    """transformers model from BASE_DIR with peft LoRA adapters; returns (model, base weight fingerprint)."""
    require_peft()
    from transformers import AutoModelForCausalLM

    from slmkit.model.weights import open_pretrained

    base = open_pretrained(AutoModelForCausalLM, base_dir, dtype=torch.float32)
    fingerprint = weights_fingerprint(base)
    torch.manual_seed(seed)  # LoRA's A matrices start random: same seed, same adapter
    return add_lora(base, lora, "CAUSAL_LM", "all-linear", example="q_proj,v_proj"), fingerprint


def start_folder(session: Session, cfg: TuneConfig, tok, block: int, lr: float) -> None:
    """The first writes of the run: run file, metrics log, tokenizer (with the chat template it trains with), and
    a full fine-tune's generation config."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.out / RUN_FILE, {**run_file(cfg), "block_size": block, "lr": lr})
    session.start_log(cfg.resume)
    if cfg.task == "sft" and not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE  # the template it was trained with travels with it
    tok.save_pretrained(cfg.out)
    gen = cfg.model_dir / "generation_config.json"
    if cfg.lora is None and gen.is_file():
        shutil.copyfile(gen, cfg.out / "generation_config.json")


def report(summary: dict, cfg: TuneConfig) -> None:
    final = summary["final_eval"]
    if final:
        print(f"held-out{' assistant' if cfg.task == 'sft' else ''} loss {final['loss']:.4f} | perplexity "
              f"{final['perplexity']:.2f} | {summary['step']:,} steps in {summary['train_seconds']:.0f} s")
    if summary["interrupted"]:
        print(f"interrupted: checkpoint saved; continue with: slm finetune {cfg.model_dir} --data ... --out {cfg.out} "
              "--resume")
    print(f"{'adapter' if cfg.lora else 'model'} folder: {cfg.out}"
          + (f" (merge into its base with: slm merge {cfg.out} --out DIR)" if cfg.lora else ""))


# ----------------------------------------------------------------------------------------------------------------
# The tasks: batches, loss and held-out evaluation


def causal_task(cfg: TuneConfig, files, tok, block: int, dev: str, eval_autocast) -> Task:
    """Next-token loss on raw text, held out from its end."""
    bin_path, meta = tokenize_to_memmap(files, tok, text_col=cfg.text_col, replace_errors=cfg.replace_errors,
                                        skip_bad_lines=cfg.skip_bad_lines)
    train_tokens, val_tokens = split_tokens(load_tokens(bin_path, meta), cfg.val_fraction, block)
    token_bytes, bsz = token_byte_lengths(tok), cfg.batch_size
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    windows = EpochSampler(lambda epoch: epoch_windows(len(train_tokens), block, cfg.seed + 1, epoch)) \
        if cfg.sampling == "epoch" else None

    def evaluate(model, n_tokens: int) -> dict:
        return evaluate_tokens(model, val_tokens, block, token_bytes, max_windows=max(1, n_tokens // block),
                               device=dev, autocast_dtype=eval_autocast)

    next_batch = (lambda: batch_at(train_tokens, windows.take(bsz), block, dev)) if windows else (
        lambda: get_batch(train_tokens, bsz, block, gen, dev))
    return Task(next_batch, causal_lm_loss, evaluate if len(val_tokens) else None, len(train_tokens) // (bsz * block),
                gen, windows, f"data {len(train_tokens):,} train / {len(val_tokens):,} val tokens")


def sft_task(cfg: TuneConfig, files, tok, block: int, dev: str, eval_autocast) -> Task:
    """Chat rows, loss on the assistant's tokens; the last conversations held out."""
    from slmkit.data.chat import build_examples, evaluate_chat, is_chat_jsonl, pad_id_of, read_conversations

    for f in files:
        if not is_chat_jsonl(f):
            raise SystemExit(f"error: {f} is not chat JSONL; --task sft reads rows like {{\"messages\": [...]}} or "
                             "{\"prompt\": ..., \"response\": ...} (raw text: use --task causal)")
    conversations = read_conversations(files, cfg.skip_bad_lines)
    n_val = int(len(conversations) * cfg.val_fraction)
    if cfg.val_fraction > 0 and len(conversations) >= 2:
        n_val = max(1, n_val)
    train_ex = build_examples(conversations[:len(conversations) - n_val], tok, block)
    val_ex = build_examples(conversations[len(conversations) - n_val:], tok, block) if n_val else []
    pad, bsz = pad_id_of(tok), cfg.batch_size
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    next_batch, windows, per_pass = sft_batches(cfg, train_ex, block, bsz, pad, gen, dev)

    def evaluate(model, n_tokens: int) -> dict:
        keep, seen = [], 0
        for e in val_ex:  # the first conversations up to N_TOKENS tokens (always at least one)
            if keep and seen + len(e[0]) > n_tokens:
                break
            keep.append(e)
            seen += len(e[0])
        return evaluate_chat(model, keep, pad, bsz, dev)

    return Task(next_batch, sft_loss, evaluate if val_ex else None, per_pass, gen, windows,
                f"data {len(train_ex):,} train / {len(val_ex):,} val conversations", final_tokens=1 << 62)


def sft_batches(cfg: TuneConfig, train_ex: list, block: int, bsz: int, pad: int, gen: torch.Generator, dev: str):
    """-> (next_batch, the EpochSampler of shuffled passes or None, batches a pass): conversations packed end to end
    (--packing) or padded, each once a pass (--sampling epoch) or drawn at random."""
    from slmkit.data.chat import pack, packed_batch, padded_batch

    seed = cfg.seed + 1  # as the generator's
    shuffled = cfg.sampling == "epoch"
    if cfg.packing:
        stream = pack(train_ex)
        windows = EpochSampler(lambda epoch: epoch_windows(len(stream[0]), block, seed, epoch)) if shuffled else None

        def next_packed():
            starts = windows.take(bsz) if windows else None
            return tuple(t.to(dev) for t in packed_batch(stream, bsz, block, gen, starts))

        return next_packed, windows, len(stream[0]) // (bsz * block)
    windows = EpochSampler(lambda epoch: epoch_rows(len(train_ex), seed, epoch)) if shuffled else None

    def next_padded():
        rows = windows.take(bsz) if windows else torch.randint(len(train_ex), (bsz,), generator=gen).tolist()
        return tuple(t.to(dev) for t in padded_batch(train_ex, rows, pad))

    return next_padded, windows, len(train_ex) // bsz


def add_args(p) -> None:
    p.add_argument("model_dir", type=Path, help="model folder to fine-tune (from slm train, slm import or any "
                   "Hugging Face causal-LM folder)")
    p.add_argument("--data", nargs="+", required=True, help="causal: text files, dirs, globs, JSONL, CSV, Parquet "
                   "(as slm train); sft: chat JSONL ({\"messages\": [...]} or {\"prompt\", \"response\"})")
    p.add_argument("--out", type=Path, required=True, help="output folder (a model folder; an adapter with --lora)")
    p.add_argument("--task", choices=["causal", "sft", "classify"], default="causal",
                   help="causal: continued pretraining on raw text (default); sft: chat, loss on assistant tokens; "
                   "classify: text classification (slmkit.training.classify)")
    g = p.add_argument_group("LoRA (full fine-tuning otherwise)")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of every weight")
    g.add_argument("--lora-r", type=int, help="adapter rank (default: 8)")
    g.add_argument("--lora-alpha", type=float, help="adapter scale numerator (default: 16)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the adapter input (default: 0.05)")
    g.add_argument("--lora-targets", help="comma-separated module names, e.g. q_proj,v_proj (default: all linear "
                   "layers except the output head; classify: the attention projections)")
    g = p.add_argument_group("budget (the first one reached ends training; default 5 minutes)")
    g.add_argument("--time", help="training time: 180, 180s, 3m, 1h")
    g.add_argument("--steps", help="optimizer steps, e.g. 500")
    g.add_argument("--tokens", help="training tokens, e.g. 2M")
    g = p.add_argument_group("optimisation")
    g.add_argument("--block-size", type=int, help="context / longest conversation in tokens (default: 512 or the "
                   "model's context if shorter)")
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch (default: 8; classify: 16)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 1e-4 full, 1e-3 LoRA; classify: 5e-5 for "
                   "models 512+ wide)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak (default 0.1)")
    g.add_argument("--warmup", type=int, help="warmup steps (default: 10; classify: a tenth of the steps)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default: 0; classify: 0.01)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip, 0 to disable (default: 1.0)")
    g.add_argument("--packing", action="store_true", default=None, help="sft: pack conversations end to end instead "
                   "of padding")
    g.add_argument("--sampling", choices=["epoch", "random"], default=None, help="epoch (default): shuffled passes, "
                   "every window (sft: every conversation) once a pass; random: independent random draws (runs "
                   "saved before shuffled passes resume with it)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on GPUs that support it and, for models 128+ dims wide, on CPUs "
                        "whose bf16 products measure 3x+ fp32's (AMX, Zen 5); fp32 otherwise (bf16 on a CPU "
                        "without bf16 units warns: it runs emulated, ~15x slower)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
    g.add_argument("--seed", type=int, default=1337, help="random seed (default: 1337)")
    g = p.add_argument_group("data, evaluation and checkpoints")
    g.add_argument("--val-fraction", type=float, default=0.1, help="held-out share, from the end (default: 0.1)")
    g.add_argument("--text-col", default="text", help="causal, classify: text field/column for JSONL, CSV, Parquet")
    g.add_argument("--label-col", help="classify: label field/column (default: label)")
    g.add_argument("--eval-data", type=Path, help="classify: held-out labelled file (default: a stratified split "
                   "of --data)")
    g.add_argument("--epochs", type=float, help="classify: passes over the data (default: 3)")
    g.add_argument("--patience", type=int, help="stop after this many evaluations without improvement, keeping the "
                   "best weights (default: 3; causal/sft count evaluations over 1%% worse than the best; 0 = run the "
                   "whole budget)")
    g.add_argument("--max-length", type=int, help="classify: truncate texts to this many tokens (default: 128)")
    g.add_argument("--replace-errors", action="store_true", help="replace undecodable bytes instead of failing")
    g.add_argument("--skip-bad-lines", action="store_true", default=None, help="skip malformed JSONL rows (with a "
                   "warning)")
    g.add_argument("--eval-every", help="evaluate every N steps (a number) or every duration (30s, 2m)")
    g.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens per periodic evaluation")
    g.add_argument("--checkpoint-every", help="checkpoint interval in training time (default: 2m; classify "
                   "runs keep no checkpoint)")
    g.add_argument("--resume", action="store_true", default=None, help="continue the run saved in --out (full or "
                   "LoRA; not classify)")
    g.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
