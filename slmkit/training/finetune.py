"""Verb `finetune`: specialize an existing model folder — continued pretraining or chat SFT, full or LoRA.

    model folder + tokenizer -> data (raw text: token memmap | chat JSONL: ids + assistant-only labels)
      -> model (full: every weight | --lora: peft adapters on the linear layers) -> train.fit -> folder

- `--task causal`: next-token loss on raw text, read and tokenized exactly as `slm train` does (data.py), with the
  model's own tokenizer.
- `--task sft`: chat rows rendered with the model's chat template (ChatML when it has none), loss on assistant
  tokens only (chat_data.py); `--packing` concatenates conversations instead of padding them.
- `--task classify`: handed to `slmkit.training.classify.main` (encoders; see `slm finetune --task classify`).

Full fine-tuning runs plain Llama models on slmkit's fast module and writes a model folder. LoRA runs on
transformers' module (AutoModelForCausalLM), so the adapter peft saves targets the standard layer names (q_proj,
gate_proj …) and opens with peft anywhere; the adapter folder records its base (path + weight fingerprint) and
`slm merge` folds it in. Checkpoints of a LoRA run hold only the adapter and its optimizer state. Budgets,
progress, evaluation, checkpoints, `--resume`, metrics.jsonl and loss.png are those of `slm train` (train.fit).
"""

from __future__ import annotations

import inspect
import json
import shutil
from functools import partial
from pathlib import Path

import torch

DEFAULT_LR = {"full": 1e-4, "lora": 1e-3}
RUN_FILE = "finetune_args.json"
# Settings a resumed run must share with the saved one (everything else comes from the saved run, budgets may grow).
SAME_ON_RESUME = ("model_dir", "task", "lora")


class TrainableView:
    """The trainable tensors of a model (a LoRA run's adapters) behind state_dict()/load_state_dict(), so a
    checkpoint holds the adapter and its optimizer state, not another copy of the frozen base."""

    def __init__(self, model: torch.nn.Module):
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.params)

    def load_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
        if set(sd) != set(self.params):
            raise SystemExit("error: --resume: the checkpoint holds other trainable tensors than this run builds "
                             "(different --lora-* settings?); resume with the original settings")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(sd[name])


def lora_model(base_dir: Path, r: int, alpha: float, dropout: float, targets: list[str] | None, seed: int):
    """transformers model from BASE_DIR with peft LoRA adapters; returns (model, base weight fingerprint)."""
    from slmkit.model.adapters import require_peft, weights_fingerprint

    require_peft()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
    fingerprint = weights_fingerprint(base)
    torch.manual_seed(seed)  # LoRA's A matrices start random: same seed, same adapter
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets or "all-linear",
                     task_type="CAUSAL_LM")
    try:
        return get_peft_model(base, cfg), fingerprint
    except ValueError as e:
        raise SystemExit(f"error: --lora-targets {','.join(targets or ['all-linear'])}: {str(e).splitlines()[0]}; "
                         "name linear layers of this model (e.g. q_proj,v_proj)") from None


def _classify(options: dict):
    """--task classify lives in slmkit/training/classify.py (encoders). Pass it the options set to other values than
    finetune's defaults (so its own defaults apply otherwise), those its main() accepts."""
    try:
        from slmkit.training import classify
    except ModuleNotFoundError as e:
        if e.name != "slmkit.training.classify":
            raise
        raise SystemExit("error: --task classify needs slmkit/training/classify.py, which this installation lacks; "
                         "use --task causal or --task sft") from None
    ours = inspect.signature(main).parameters
    options = {k: v for k, v in options.items() if ours[k].default is inspect.Parameter.empty
               or v != ours[k].default}
    params = inspect.signature(classify.main).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        options = {k: v for k, v in options.items() if k in params}
    return classify.main(**options)


def main(model_dir: Path, data: list[str], out: Path, task: str = "causal", lora: bool = False, lora_r: int = 8,
         lora_alpha: float = 16.0, lora_dropout: float = 0.05, lora_targets: str | list[str] | None = None,
         packing: bool = False, sampling: str | None = None, block_size: int | None = None, batch_size: int = 8,
         grad_accum: int = 1, lr: float | None = None, min_lr_ratio: float = 0.1, warmup: int = 10,
         weight_decay: float = 0.0,
         clip: float = 1.0, steps: int | str | None = None, tokens: int | str | None = None,
         time: str | float | None = None, val_fraction: float = 0.1, eval_every: str | None = None,
         eval_tokens: int = 65536, checkpoint_every: str = "2m", dtype: str = "auto", device: str = "auto",
         seed: int = 1337, resume: bool = False, overwrite: bool = False, text_col: str = "text",
         replace_errors: bool = False, skip_bad_lines: bool = False, progress: bool = True,
         label_col: str = "label", eval_data: Path | None = None, epochs: float | None = None,
         patience: int | None = None, max_length: int | None = None) -> dict:
    """Fine-tune the model in MODEL_DIR on DATA and write the result to OUT: a model folder, or with --lora an
    adapter folder (merge it with `slm merge`). With a held-out split, OUT keeps the weights that scored best on it,
    and training stops once PATIENCE (default 3) evaluations since the best scored over 1% worse (0: run the whole
    budget, keep the last weights). Returns a summary dict."""
    options = dict(locals())  # the arguments, for --task classify
    from slmkit.data.corpus import expand_paths
    from slmkit.files import atomic_write_json
    from slmkit.hardware import eval_dtype, pick_device, pick_dtype, precision_name
    from slmkit.infer.load import load_model, read_config
    from slmkit.model.adapters import ADAPTER_RECORD, is_adapter_folder
    from slmkit.model.checkpoint import CHECKPOINT, load_checkpoint, read_checkpoint_state, save_checkpoint
    from slmkit.model.folder import count_parameters, save_model
    from slmkit.model.tokenizer import load_tokenizer
    from slmkit.options import parse_count, parse_duration
    from slmkit.training.fit import EarlyStop, FitConfig, FitState, budget_from, fit
    from slmkit.training.losses import causal_lm_loss, sft_loss
    from slmkit.training.optim import make_optimizer
    from slmkit.training.report import plot_loss, read_metrics

    if isinstance(lora_targets, str):
        lora_targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
    if task == "classify":
        return _classify({k: v for k, v in {**options, "lora_targets": lora_targets}.items() if k != "task"})
    if eval_data is not None or epochs is not None or max_length is not None:
        raise SystemExit("error: --eval-data, --epochs and --max-length are for --task classify; causal and sft hold "
                         "out the end of --data (--val-fraction) and use --block-size")
    if task not in ("causal", "sft"):
        raise SystemExit(f"error: unknown --task {task!r}; use causal, sft or classify")
    model_dir, out = Path(model_dir), Path(out)
    if model_dir.is_file():
        raise SystemExit(f"error: {model_dir} is a file; import it as a model folder first: slm import {model_dir} "
                         "--out DIR")
    if is_adapter_folder(model_dir):
        raise SystemExit(f"error: {model_dir} is a LoRA adapter; merge it first (slm merge {model_dir} --out DIR) "
                         "and fine-tune the merged folder")
    hf_cfg = read_config(model_dir)  # one-line error when it is not a model folder
    if out.resolve() == model_dir.resolve():
        raise SystemExit("error: --out must differ from the model folder being fine-tuned")
    ckpt_path = out / CHECKPOINT
    args = dict(model_dir=str(model_dir.resolve()), data=[str(d) for d in data], task=task, lora=lora,
                lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets,
                packing=packing, sampling=sampling, block_size=block_size, batch_size=batch_size,
                grad_accum=grad_accum, lr=lr,
                min_lr_ratio=min_lr_ratio, warmup=warmup, weight_decay=weight_decay, clip=clip,
                steps=parse_count(steps), tokens=parse_count(tokens), time=parse_duration(time),
                val_fraction=val_fraction, seed=seed, text_col=text_col, dtype=dtype)
    if resume:
        if not ckpt_path.is_file() or not (out / RUN_FILE).is_file():
            raise SystemExit(f"error: --resume: {out} holds no {CHECKPOINT} of a finetune run; start without --resume")
        saved = json.loads((out / RUN_FILE).read_text())
        for key in SAME_ON_RESUME:
            if saved.get(key) != args[key]:
                raise SystemExit(f"error: --resume: {key} {args[key]!r} differs from the saved run's "
                                 f"{saved.get(key)!r}; resume with the original settings or start a new --out")
        # Everything that shapes the run comes from the saved one; budgets may be extended.
        args = {**saved, **{k: args[k] for k in ("steps", "tokens", "time") if args[k] is not None}}
        args.setdefault("sampling", "random")  # runs saved before shuffled passes drew at random
    elif out.exists() and any((out / n).exists() for n in ("config.json", "adapter_config.json", CHECKPOINT)):
        if not overwrite:
            raise SystemExit(f"error: {out} already holds a model; pass --resume to continue it, --overwrite to "
                             "replace it, or choose another --out")
    args["sampling"] = args["sampling"] or "epoch"
    if args["sampling"] not in ("epoch", "random"):
        raise SystemExit(f"error: --sampling {args['sampling']!r}: use epoch (shuffled passes) or random")
    budget = budget_from(args, loop_args=dict(
        patience=patience, eval_tokens=eval_tokens, eval_every=eval_every, checkpoint_every=checkpoint_every))
    dev = pick_device(device)
    autocast_dtype = pick_dtype(args["dtype"], dev, hf_cfg.get("hidden_size") or hf_cfg.get("n_embd"))
    method = "lora" if args["lora"] else "full"
    peak_lr = args["lr"] or DEFAULT_LR[method]
    context = int(hf_cfg.get("max_position_embeddings") or hf_cfg.get("n_positions") or 2048)
    block = args["block_size"] or min(512, context)
    if block > context:
        raise SystemExit(f"error: --block-size {block} exceeds the model's context ({context} tokens)")
    bsz = args["batch_size"]
    torch.manual_seed(args["seed"])

    # 1. tokenizer and data (all checks before anything is written)
    tok = load_tokenizer(model_dir)
    files = expand_paths(args["data"])
    sampler = torch.Generator().manual_seed(args["seed"] + 1)
    next_batch, evaluate_periodic, final_eval, data_note, epoch_batches, windows = _prepare_data(
        args, files, tok, block, bsz, sampler, dev, eval_dtype(autocast_dtype, dev), eval_tokens, replace_errors,
        skip_bad_lines)

    # 2. model: every weight (fast module for plain Llama) or LoRA adapters on transformers' module
    fingerprint = None
    if args["lora"]:
        model, fingerprint = lora_model(Path(args["model_dir"]), args["lora_r"], args["lora_alpha"],
                                        args["lora_dropout"], args["lora_targets"], args["seed"])
        ckpt_target = TrainableView(model)
    else:
        model = load_model(model_dir)
        ckpt_target = model
    model.to(dev)
    n_params = count_parameters(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = make_optimizer(model, peak_lr, args["weight_decay"], dev)
    state = FitState()
    # Early stopping: OUT holds the weights with the best held-out loss so far (written when it improves).
    early = EarlyStop(3 if patience is None else patience)
    keep_best = early.patience > 0 and evaluate_periodic is not None
    if resume:
        saved_state = read_checkpoint_state(ckpt_path)
        if fingerprint and saved_state.get("base_fingerprint") not in (None, fingerprint):
            raise SystemExit(f"error: --resume: the base model {args['model_dir']} has changed since this adapter "
                             "was trained; restore it or start a new --out")
        st = load_checkpoint(ckpt_path, ckpt_target, optimizer, {"sampler": sampler})
        state = FitState(st["step"], st["tokens"], st["train_seconds"], st.get("best_val"), {})
        if windows:
            windows.drawn = st.get("windows_drawn", 0)
        early.load(st)

    # 3. the output folder (the first write of this run)
    if not resume and overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN_FILE, {**args, "block_size": block, "lr": peak_lr})
    metrics_path = out / "metrics.jsonl"
    if not resume:
        metrics_path.unlink(missing_ok=True)
    if task == "sft" and not getattr(tok, "chat_template", None):
        from slmkit.model.tokenizer import CHATML_TEMPLATE

        tok.chat_template = CHATML_TEMPLATE  # the template it was trained with travels with it
    tok.save_pretrained(out)

    def log(row: dict) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_weights() -> None:
        if args["lora"]:
            model.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors
            atomic_write_json(out / ADAPTER_RECORD, {"base_model": args["model_dir"], "base_fingerprint": fingerprint,
                                                     "task": task, "created_by": "slm finetune --lora"})
        else:
            save_model(model, out)
            gen = model_dir / "generation_config.json"
            if gen.is_file():
                shutil.copyfile(gen, out / "generation_config.json")

    def checkpoint(st: FitState) -> None:
        save_checkpoint(ckpt_path, ckpt_target, optimizer, {"sampler": sampler},
                        {"step": st.step, "tokens": st.tokens, "train_seconds": st.train_seconds,
                         "best_val": st.best_val, "base_fingerprint": fingerprint, **early.as_dict(),
                         "windows_drawn": windows.drawn if windows else 0})
        if not keep_best:  # otherwise evaluate() writes the weights when the held-out loss improves
            write_weights()

    def evaluate(m) -> dict:
        r = evaluate_periodic(m)
        if keep_best:
            improved, r["stop"] = early.update(r["loss"], state.step)
            if improved:
                write_weights()
        return r

    print(f"finetune ({task}, {method}): {Path(args['model_dir']).name} | {n_params:,} parameters, {n_train:,} "
          f"trainable | block {block} | batch {bsz}x{args['grad_accum']} | lr {peak_lr:g} | {dev} "
          f"{precision_name(autocast_dtype)} | {data_note}")
    every_s = parse_duration(eval_every) if eval_every and not str(eval_every).isdigit() else None
    fit_cfg = FitConfig(
        lr=peak_lr, min_lr_ratio=args["min_lr_ratio"], warmup_steps=args["warmup"], grad_accum=args["grad_accum"],
        clip=args["clip"], device=dev, autocast_dtype=autocast_dtype, progress_bar=progress,
        eval_every_steps=int(eval_every) if eval_every and str(eval_every).isdigit() else None,
        eval_every_s=every_s or max(10.0, (budget.seconds or 300.0) / 8),
        eval_max_steps=max(1, epoch_batches // args["grad_accum"]) if keep_best else None,  # at least once per pass
        checkpoint_every_s=parse_duration(checkpoint_every))
    loss_fn = sft_loss if task == "sft" else causal_lm_loss
    state = fit(model, optimizer, next_batch, loss_fn, budget, fit_cfg, state,
                evaluate=evaluate if evaluate_periodic else None, checkpoint=checkpoint, log=log)

    # 4. final: checkpoint, the best weights (by held-out loss), full held-out evaluation, plot, summary
    stopped_early = bool(state.last_eval.get("stop"))
    if keep_best and early.last_step != state.step:  # the last weights may be the best: score them too
        evaluate(model)
    checkpoint(state)  # after that evaluation, so a resumed run knows the best loss the folder holds
    if keep_best and early.best_step != state.step:
        _restore_best(model, out, args["lora"])
        print(early.report(stopped_early, state.step))
    final = final_eval(model)
    log({"kind": "final", **final, "step": state.step, "tokens": state.tokens,
         "eval_tokens": final.get("tokens", 0), "train_seconds": state.train_seconds})
    plot_loss(read_metrics(metrics_path), out / "loss.png", title=f"{out.name}: {task} ({method})")
    summary = {"out": str(out), "task": task, "method": method, "base_model": args["model_dir"],
               "parameters": n_params, "trainable_parameters": n_train, "step": state.step,
               "tokens_seen": state.tokens, "train_seconds": state.train_seconds,
               "tokens_per_s": state.tokens / max(1e-9, state.train_seconds), "final_eval": final,
               "interrupted": state.last_eval.get("interrupted", False), "lr": peak_lr, "block_size": block,
               "best_step": early.best_step, "stopped_early": stopped_early, "sampling": args["sampling"]}
    atomic_write_json(out / "training_summary.json", summary)
    if final:
        print(f"held-out{' assistant' if task == 'sft' else ''} loss {final['loss']:.4f} | perplexity "
              f"{final['perplexity']:.2f} | {state.step:,} steps in {state.train_seconds:.0f} s")
    if summary["interrupted"]:
        print(f"interrupted: checkpoint saved; continue with: slm finetune {model_dir} --data ... --out {out} --resume")
    print(f"{'adapter' if args['lora'] else 'model'} folder: {out}"
          + (f" (merge into its base with: slm merge {out} --out DIR)" if args["lora"] else ""))
    return summary


def _restore_best(model: torch.nn.Module, out: Path, lora: bool) -> None:
    """Copy the best weights, written to OUT when the held-out loss improved, back into MODEL."""
    from slmkit.model.folder import load_saved_weights

    if lora:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(out / "adapter_model.safetensors"))
    else:
        load_saved_weights(model, out)


def _prepare_data(args: dict, files, tok, block: int, bsz: int, sampler: torch.Generator, dev: str,
                  eval_autocast, eval_tokens: int, replace_errors: bool, skip_bad_lines: bool):
    """-> (next_batch(), evaluate(model) periodic, final_eval(model) on the whole held-out split, a note, batches
    per pass over the training data, the EpochSampler of shuffled passes or None for random draws)."""
    from slmkit.data.corpus import EpochSampler, epoch_rows, epoch_windows

    shuffled = args["sampling"] == "epoch"
    seed = args["seed"] + 1  # as SAMPLER's
    if args["task"] == "causal":
        from slmkit.data.corpus import batch_at, get_batch, load_tokens, split_tokens, tokenize_to_memmap
        from slmkit.infer.evaluate import evaluate_tokens
        from slmkit.model.tokenizer import token_byte_lengths

        bin_path, meta = tokenize_to_memmap(files, tok, text_col=args["text_col"], replace_errors=replace_errors,
                                            skip_bad_lines=skip_bad_lines)
        train_tokens, val_tokens = split_tokens(load_tokens(bin_path, meta), args["val_fraction"], block)
        token_bytes = token_byte_lengths(tok)

        def evaluate_at_most(model, n_tokens: int) -> dict:
            return evaluate_tokens(model, val_tokens, block, token_bytes, max_windows=max(1, n_tokens // block),
                                   device=dev, autocast_dtype=eval_autocast)

        held_out = len(val_tokens) > 0
        windows = EpochSampler(partial(epoch_windows, len(train_tokens), block, seed)) if shuffled else None
        return ((lambda: batch_at(train_tokens, windows.take(bsz), block, dev)) if windows
                else (lambda: get_batch(train_tokens, bsz, block, sampler, dev)),
                (lambda m: evaluate_at_most(m, eval_tokens)) if held_out else None,
                lambda m: evaluate_at_most(m, 4_000_000) if held_out else {},
                f"data {len(train_tokens):,} train / {len(val_tokens):,} val tokens",
                len(train_tokens) // (bsz * block), windows)

    from slmkit.data.chat import (
        build_examples,
        evaluate_chat,
        is_chat_jsonl,
        pack,
        packed_batch,
        pad_id_of,
        padded_batch,
        read_conversations,
    )

    for f in files:
        if not is_chat_jsonl(f):
            raise SystemExit(f"error: {f} is not chat JSONL; --task sft reads rows like {{\"messages\": [...]}} or "
                             "{\"prompt\": ..., \"response\": ...} (raw text: use --task causal)")
    conversations = read_conversations(files, skip_bad_lines)
    n_val = int(len(conversations) * args["val_fraction"])
    if args["val_fraction"] > 0 and len(conversations) >= 2:
        n_val = max(1, n_val)
    train_ex = build_examples(conversations[:len(conversations) - n_val], tok, block)
    val_ex = build_examples(conversations[len(conversations) - n_val:], tok, block) if n_val else []
    pad = pad_id_of(tok)
    epoch_batches = len(train_ex) // bsz
    if args["packing"]:
        stream = pack(train_ex)
        epoch_batches = len(stream[0]) // (bsz * block)
        windows = EpochSampler(partial(epoch_windows, len(stream[0]), block, seed)) if shuffled else None

        def next_batch():
            starts = windows.take(bsz) if windows else None
            return tuple(t.to(dev) for t in packed_batch(stream, bsz, block, sampler, starts))
    else:
        windows = EpochSampler(partial(epoch_rows, len(train_ex), seed)) if shuffled else None

        def next_batch():
            rows = windows.take(bsz) if windows else torch.randint(len(train_ex), (bsz,), generator=sampler).tolist()
            return tuple(t.to(dev) for t in padded_batch(train_ex, rows, pad))

    def evaluate_at_most(model, n_tokens: int) -> dict:
        keep, seen = [], 0
        for e in val_ex:  # the first conversations up to N_TOKENS tokens (always at least one)
            if keep and seen + len(e[0]) > n_tokens:
                break
            keep.append(e)
            seen += len(e[0])
        return evaluate_chat(model, keep, pad, bsz, dev)

    return (next_batch, (lambda m: evaluate_at_most(m, eval_tokens)) if val_ex else None,
            lambda m: evaluate_at_most(m, 1 << 62) if val_ex else {},
            f"data {len(train_ex):,} train / {len(val_ex):,} val conversations", epoch_batches, windows)


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
    g.add_argument("--lora-r", type=int, default=8, help="adapter rank (default: 8)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale numerator (default: 16)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapter input (default: 0.05)")
    g.add_argument("--lora-targets", help="comma-separated module names, e.g. q_proj,v_proj (default: all linear "
                   "layers except the output head)")
    g = p.add_argument_group("budget (the first one reached ends training; default 5 minutes)")
    g.add_argument("--time", help="training time: 180, 180s, 3m, 1h")
    g.add_argument("--steps", help="optimizer steps, e.g. 500")
    g.add_argument("--tokens", help="training tokens, e.g. 2M")
    g = p.add_argument_group("optimisation")
    g.add_argument("--block-size", type=int, help="context / longest conversation in tokens (default: 512 or the "
                   "model's context if shorter)")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch (default: 8)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 1e-4 full, 1e-3 LoRA)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak (default 0.1)")
    g.add_argument("--warmup", type=int, default=10, help="warmup steps (default: 10)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices (default: 0)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip, 0 to disable (default: 1.0)")
    g.add_argument("--packing", action="store_true", help="sft: pack conversations end to end instead of padding")
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
    g.add_argument("--label-col", default="label", help="classify: label field/column (default: label)")
    g.add_argument("--eval-data", type=Path, help="classify: held-out labelled file (default: a stratified split "
                   "of --data)")
    g.add_argument("--epochs", type=float, help="classify: passes over the data (default: 3)")
    g.add_argument("--patience", type=int, help="stop after this many evaluations without improvement, keeping the "
                   "best weights (default: 3; causal/sft count evaluations over 1%% worse than the best; 0 = run the "
                   "whole budget)")
    g.add_argument("--max-length", type=int, help="classify: truncate texts to this many tokens (default: 128)")
    g.add_argument("--replace-errors", action="store_true", help="replace undecodable bytes instead of failing")
    g.add_argument("--skip-bad-lines", action="store_true", help="skip malformed JSONL rows (with a warning)")
    g.add_argument("--eval-every", help="evaluate every N steps (a number) or every duration (30s, 2m)")
    g.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens per periodic evaluation")
    g.add_argument("--checkpoint-every", default="2m", help="checkpoint interval in training time (default: 2m)")
    g.add_argument("--resume", action="store_true", help="continue the run saved in --out (full or LoRA)")
    g.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
