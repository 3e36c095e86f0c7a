"""Verb `train`: tokenizer + model from scratch on a corpus.

    corpus files -> tokenizer (trained or reused) -> token memmap (cached) -> model (preset) -> fit -> model folder

The loop itself (`fit`, budgets, the learning-rate schedule) is slmkit/loop.py. Checkpoints are atomic and hold
optimizer, RNG and data-sampler state, so `--resume` continues the same trajectory. Under `torchrun` the same command
trains data-parallel (DDP).
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import torch

from slmkit.data import mlm as encoders
from slmkit.files import atomic_write_json
from slmkit.hardware import eval_dtype, pick_device, pick_dtype, precision_name, require_cpp_compiler
from slmkit.model.checkpoint import CHECKPOINT, load_checkpoint, read_checkpoint_state, save_checkpoint
from slmkit.model.folder import base_parameter_count, build_model, load_saved_weights, save_model, unwrap
from slmkit.model.llama import set_dropout
from slmkit.model.presets import build_config, is_encoder
from slmkit.options import parse_count, parse_duration
from slmkit.training import recipe
from slmkit.training.fit import EarlyStop, FitConfig, FitState, budget_from, fit
from slmkit.training.losses import causal_lm_loss
from slmkit.training.optim import make_optimizer, set_weight_decay

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



# ----------------------------------------------------------------------------------------------------------------
# The verb

# Held-out tokens below which the logits are not calibrated: one number fitted on a few hundred tokens is noise.
MIN_CALIBRATION_TOKENS = 2048
RUN_FILE = "train_args.json"


def main(data: list[str], out: Path, preset: str = "auto", tokenizer: str | None = None, vocab_size: int | None = None,
         tokenizer_from: Path | None = None, block_size: int | None = None, batch_size: int | None = None,
         grad_accum: int = 1, lr: float | None = None, min_lr_ratio: float = 0.1, warmup: int | None = None,
         weight_decay: float | None = None, dropout: float | None = None, dropout_start: float | None = None,
         sampling: str | None = None, clip: float = 1.0, steps: int | str | None = None,
         tokens: int | str | None = None,
         optimizer: str | None = None, time: str | float | None = None, val_fraction: float | None = None,
         eval_data: list[str] | None = None,
         eval_every: str | None = None, eval_tokens: int = 65536, checkpoint_every: str = "2m", dtype: str = "auto",
         device: str = "auto", compile: bool = False, seed: int = 1337, resume: bool = False, overwrite: bool = False,
         set: list[str] | None = None, text_col: str = "text", replace_errors: bool = False,
         progress: bool = True, lowercase: bool = False, patience: int = 3, calibrate: bool = True) -> dict:
    """Train a tokenizer and a decoder (or a masked-LM encoder) on DATA and write a Hugging Face model folder to OUT.

    With a held-out split, the folder holds the weights that scored best on it, and training stops once PATIENCE
    evaluations since the best scored over 1% worse than it (0: train to the end of the budget, keep the last
    weights). Then a decoder's logits are calibrated on that split (CALIBRATE: evaluate.fit_temperature, folded into
    the final norm by models.scale_logits).
    Returns a summary dict (parameters, steps, tokens, train_seconds, final_eval, best_step, out).
    """
    from slmkit import distributed as dist
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
    from slmkit.infer.evaluate import evaluate_tokens as eval_fn  # encoders swap in masked-LM evaluation (step 4)
    from slmkit.model.tokenizer import token_byte_lengths
    from slmkit.training.report import plot_loss, read_metrics, write_model_card

    out = Path(out)
    dev = pick_device(device)
    if compile and dev == "cpu":
        require_cpp_compiler()
    dist.setup(dev)
    ckpt_path = out / CHECKPOINT
    args = dict(data=[str(d) for d in data], preset=preset, tokenizer=tokenizer, vocab_size=vocab_size,
                tokenizer_from=str(tokenizer_from) if tokenizer_from else None, block_size=block_size,
                batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr_ratio=min_lr_ratio, warmup=warmup,
                weight_decay=weight_decay, dropout=dropout, dropout_start=dropout_start, sampling=sampling, clip=clip,
                steps=parse_count(steps), tokens=parse_count(tokens), optimizer=optimizer,
                time=parse_duration(time), val_fraction=val_fraction,
                eval_data=[str(d) for d in eval_data] if eval_data else None, seed=seed, set=list(set or []),
                text_col=text_col, dtype=dtype, lowercase=lowercase)
    if eval_data and val_fraction is not None:
        raise SystemExit("error: give --eval-data or --val-fraction, not both (--eval-data holds nothing out of "
                         "--data)")
    if resume:
        if not ckpt_path.is_file():
            raise SystemExit(f"error: --resume: {out} holds no {CHECKPOINT}; start without --resume")
        saved = json.loads((out / RUN_FILE).read_text())
        _check_resume_compatible(saved, args)
        # Budgets may be extended on resume; everything that shapes the model comes from the saved run.
        args = {**saved, **{k: args[k] for k in ("steps", "tokens", "time") if args[k] is not None}}
        args.setdefault("dropout_start", 0.0)  # runs saved before late dropout had it from the first step
        args.setdefault("sampling", "random")  # and before shuffled passes, random windows
        args.setdefault("replan", [])  # and before re-planning, what they were planned with
    elif (out / "config.json").exists() or ckpt_path.exists():
        if not overwrite:
            raise SystemExit(f"error: {out} already holds a model; pass --resume to continue it, --overwrite to "
                             "replace it, or choose another --out")
    args["sampling"] = args["sampling"] or "epoch"
    if args["sampling"] not in ("epoch", "random"):
        raise SystemExit(f"error: --sampling {args['sampling']!r}: use epoch (shuffled passes) or random")
    budget = budget_from(args, announce=dist.is_main(), loop_args=dict(
        patience=patience, eval_tokens=eval_tokens, eval_every=eval_every, checkpoint_every=checkpoint_every))
    files = expand_paths(args["data"])
    n_bytes = corpus_bytes(files)
    torch.manual_seed(args["seed"])

    # 1. the recipe: explicit flags win over --preset auto's choices
    auto = recipe.auto_recipe(n_bytes, dev, budget.seconds, budget.steps, budget.tokens, dtype=dtype)
    preset_name = auto["preset"] if args["preset"] == "auto" else args["preset"]
    args["tokenizer"] = encoders.pick_tokenizer(args["tokenizer"], is_encoder(preset_name), args["tokenizer_from"])
    block = args["block_size"] or auto["block_size"]
    # the recipe's tokens per step hold when only the context is given: --block-size 1024 alone takes 4 rows of 1024,
    # not 16 (4x the tokens per update, a quarter of the updates)
    bsz = args["batch_size"] or max(1, auto["batch_size"] * auto["block_size"] // block)
    warmup_steps = args["warmup"] if args["warmup"] is not None else auto["warmup_steps"]
    # --preset auto's own config fields (the untied head, the 3-layer slm-1m) are saved with the run: a resumed run
    # rebuilds the model it checkpointed, whatever auto would pick now
    if not resume:
        args["auto_overrides"] = auto["overrides"] if args["preset"] == "auto" else {}
    overrides = {**args.get("auto_overrides", {}), **parse_overrides(args["set"])}
    # built (and checked) before the tokenizer trains, so a bad --set fails fast; the vocabulary is set once it exists
    cfg = build_config(preset_name, 512, overrides, block_size=block)
    width = cfg["hidden_size"]
    # A resumed run keeps the precision its start resolved: `auto` rests on a timing (cpu_bf16_fast) that can differ
    # between two processes on a busy machine, and the trajectory must not
    autocast_dtype = pick_dtype(args["precision"] if resume and args.get("precision") else dtype, dev, width)
    args["precision"] = precision_name(autocast_dtype)
    eval_autocast = eval_dtype(autocast_dtype, dev)  # held-out evaluations: fp32 on CPU, as `slm eval` scores
    # Muon for Llama decoders: it beat AdamW on tiny Shakespeare at 200 steps and at 180 s (docs/benchmarks.md).
    # Encoders and GPT-Neo keep AdamW (not measured with Muon); runs saved before --optimizer existed used AdamW.
    llama = cfg.get("model_type", "llama") == "llama"
    args["optimizer"] = args["optimizer"] or ("adamw" if resume or not llama else "muon")
    peak_lr = args["lr"] or recipe.peak_lr(width, args["optimizer"])

    # 2. tokenizer (rank 0 trains it; the others read what it saved)
    out.mkdir(parents=True, exist_ok=True)
    tok = _get_tokenizer(args, files, out, n_bytes, preset_name, resume)
    vocab = len(tok)

    # 3. tokens, cached by content hash; held-out split from the end
    def tokenize(paths: list[Path]) -> tuple:  # rank 0 writes the cache; the others then read it
        if dist.is_main():
            tokenize_to_memmap(paths, tok, text_col=args["text_col"], replace_errors=replace_errors)
        dist.barrier()
        bin_path, meta = tokenize_to_memmap(paths, tok, text_col=args["text_col"], replace_errors=replace_errors)
        return load_tokens(bin_path, meta), meta

    all_tokens, meta = tokenize(files)
    if args.get("eval_data"):  # a separate held-out text: all of --data trains
        train_tokens, _ = split_tokens(all_tokens, 0.0, block)
        val_tokens, _ = tokenize(expand_paths(args["eval_data"]))
        if len(val_tokens) <= block + 1:
            raise SystemExit(f"error: --eval-data {' '.join(args['eval_data'])} has {len(val_tokens):,} tokens, too "
                             f"few for --block-size {block}; give more held-out text or lower --block-size")
    else:
        train_tokens, val_tokens = split_tokens(all_tokens, args["val_fraction"], block)
    token_bytes = token_byte_lengths(tok)

    # 4. model
    cfg.update(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    step_tokens = bsz * block * grad_accum * dist.world_size()
    cap = recipe.pass_cap(len(train_tokens), budget.steps, budget.tokens) if llama else None
    if cap:  # a time budget on a small corpus: end the schedule (and the run) after MAX_PASSES passes (measured on
        # Llama decoders, like the weight decay below)
        budget.tokens = cap
        if recipe.planned_tokens(cfg, vocab, block, step_tokens, dev, seconds=budget.seconds) > cap and dist.is_main():
            print(f"schedule: ends after {recipe.MAX_PASSES} passes over the {len(train_tokens):,} training tokens "
                  f"({cap:,}) if the {budget.seconds:g} s budget lasts that long: more would only memorise a corpus "
                  "this small; set --tokens to train longer")
    if cfg.get("model_type", "llama") != "llama" and block > cfg.get("max_position_embeddings", block):
        raise SystemExit(f"error: --block-size {block} exceeds the preset's max_position_embeddings")
    # More decay, then dropout too, the more often the budget repeats the data (measured on Llama decoders; the rest
    # keep the usual 0.1 and no dropout)
    passes = recipe.planned_passes(cfg, block, step_tokens, len(train_tokens), dev, budget.steps, budget.tokens,
                                   budget.seconds, dtype) if llama else 0.0
    pick = {"weight_decay": recipe.weight_decay_for, "dropout": partial(recipe.dropout_for, cfg)}  # by passes
    if args.get("replan") is None:  # what the recipe chose for a time budget is chosen again at recipe.REPLAN_AT
        # (one process: under torchrun every rank plans from the same floor, and ranks must not decide apart)
        args["replan"] = [k for k in pick if args.get(k) is None] \
            if llama and budget.seconds and dist.world_size() == 1 else []
    if args.get("weight_decay") is None:
        args["weight_decay"] = pick["weight_decay"](passes) if llama else 0.1
    if args.get("dropout") is None:
        args["dropout"] = pick["dropout"](passes) if llama else 0.0
    if args.get("dropout_start") is None:
        args["dropout_start"] = recipe.LATE_DROPOUT_START
    model = build_model(cfg).to(dev)
    set_dropout(model, args["dropout"])
    n_params = base_parameter_count(model)  # encoders: the published base count (no MLM head), like slm info
    # Muon's Newton-Schulz on a CPU in the run's precision: fp32 (--dtype fp32, or a model too narrow for bf16) must
    # not rest on cpu_bf16_fast's timing, or two runs of one seed on a busy machine could train different weights
    ns_bf16 = autocast_dtype == torch.bfloat16 if dev == "cpu" else None
    optimizer = make_optimizer(model, peak_lr, args["weight_decay"], dev, args["optimizer"], ns_bf16=ns_bf16)
    sampler = torch.Generator().manual_seed(args["seed"] + 1000 * dist.rank())  # random windows; encoders' masks
    # shuffled passes: one seed on every rank, each takes its slice of the global batch
    windows = EpochSampler(partial(epoch_windows, len(train_tokens), block, args["seed"]), dist.rank(),
                           dist.world_size()) if args["sampling"] == "epoch" else None
    state = FitState()
    # Early stopping: the folder holds the weights with the best held-out loss so far (written when it improves).
    keep_best = patience > 0 and len(val_tokens) > 0
    early = EarlyStop(patience)
    if resume:
        saved_state = read_checkpoint_state(ckpt_path)
        if saved_state.get("config") != _comparable(cfg):
            raise SystemExit(f"error: --resume: the checkpoint in {out} is a different architecture than this run "
                             "builds; resume with the original settings or start a new --out")
        st = load_checkpoint(ckpt_path, model, optimizer, {"sampler": sampler})
        if dist.world_size() > 1 and "sampler_states" in st:
            sampler.set_state(torch.tensor(st["sampler_states"][dist.rank()], dtype=torch.uint8))
        state = FitState(st["step"], st["tokens"], st["train_seconds"], st.get("best_val"), {})
        if windows:
            windows.drawn = st.get("windows_drawn", 0)
        set_weight_decay(optimizer, args["weight_decay"])  # the run file's: a re-plan may postdate this checkpoint
        early.load(st)
        if budget.progress(state.step, state.tokens, state.train_seconds) >= 1 and dist.is_main():
            print(f"--resume: {out} already reached this budget (step {state.step:,}, {state.tokens:,} tokens, "
                  f"{state.train_seconds:.0f} s of training); to train further raise "
                  + (f"--tokens (a --time budget ends after {recipe.MAX_PASSES} passes here)" if cap else
                     "--time, --steps or --tokens"))
    def save_args() -> None:  # what --resume rebuilds the run from
        if dist.is_main():
            atomic_write_json(out / RUN_FILE, {**args, "preset": preset_name, "block_size": block, "batch_size": bsz,
                                               "lr": peak_lr, "warmup": warmup_steps, "vocab_size": vocab})

    save_args()
    train_model = dist.wrap(model, dev)

    metrics_path = out / "metrics.jsonl"
    if not resume and dist.is_main():
        metrics_path.unlink(missing_ok=True)

    def log(row: dict) -> None:
        if dist.is_main():
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def evaluate(m) -> dict:
        r = eval_fn(m, val_tokens, block, token_bytes, max_windows=max(1, eval_tokens // block), device=dev,
                    autocast_dtype=eval_autocast)
        if keep_best:
            improved, r["stop"] = early.update(r["loss"], state.step)
            if improved and dist.is_main():
                save_model(m, out)
        return r

    def checkpoint(st: FitState) -> None:
        states = dist.gather_states(sampler.get_state())
        if not dist.is_main():
            return
        extra = {"sampler_states": [s.tolist() for s in states]} if len(states) > 1 else {}
        save_checkpoint(ckpt_path, model, optimizer, {"sampler": sampler},
                        {"step": st.step, "tokens": st.tokens, "train_seconds": st.train_seconds,
                         "best_val": st.best_val, "config": _comparable(cfg), **early.as_dict(), **extra,
                         "windows_drawn": windows.drawn if windows else 0})
        if not keep_best:  # otherwise evaluate() writes the folder when the held-out loss improves
            save_model(model, out)

    if dist.is_main():
        drop = f"dropout {args['dropout']:g} from {args['dropout_start']:.0%} | " if args["dropout"] else ""
        print(f"model: {preset_name} | {n_params:,} parameters | vocab {vocab:,} | block {block} | "
              f"batch {bsz}x{dist.world_size()}x{grad_accum} | lr {peak_lr:g} | wd {args['weight_decay']:g} | {drop}"
              f"{dev} {precision_name(autocast_dtype)} | data {len(train_tokens):,} train / "
              f"{len(val_tokens):,} val tokens")
    dropout_now = [args["dropout"]]

    def replan(progress: float) -> None:
        # The passes this run will make at the speed it has shown (tokens so far over the budget's progress: a
        # --tokens cap included), and what the recipe picks for them; flags the user set are not in args["replan"].
        made = state.tokens / progress / len(train_tokens)
        before = {k: args[k] for k in args["replan"]}
        args.update({k: pick[k](made) for k in args["replan"]})
        args["replan"] = []
        set_weight_decay(optimizer, args["weight_decay"])
        save_args()
        changed = [f"{k.replace('_', ' ')} {v:g} -> {args[k]:g}" for k, v in before.items() if args[k] != v]
        if changed:
            print(f"\nre-planned at {progress:.0%} of the budget from this run's speed: {made:.1f} passes over the "
                  f"data, not the {passes:.1f} planned: {', '.join(changed)}", file=sys.stderr)

    def on_progress(progress: float) -> None:
        if args["replan"] and progress >= recipe.REPLAN_AT:
            replan(progress)
        # Late dropout (Liu et al., 2023): none while the model still underfits, --dropout from --dropout-start of the
        # budget on, when the run starts repeating its data. Set when it changes: a compiled loss recompiles once.
        p = args["dropout"] if progress >= args["dropout_start"] else 0.0
        if p != dropout_now[0]:
            set_dropout(model, p)
            dropout_now[0] = p

    every_s = parse_duration(eval_every) if eval_every and not str(eval_every).isdigit() else None
    fit_cfg = FitConfig(
        lr=peak_lr, min_lr_ratio=args["min_lr_ratio"], warmup_steps=warmup_steps, grad_accum=grad_accum,
        clip=args["clip"], device=dev, autocast_dtype=autocast_dtype, progress_bar=progress,
        eval_every_steps=int(eval_every) if eval_every and str(eval_every).isdigit() else None,
        eval_every_s=every_s or max(10.0, (budget.seconds or 300.0) / 8),
        # at least once per pass over the data: a small corpus on a fast device starts to overfit within minutes
        eval_max_steps=max(1, len(train_tokens) // (bsz * block * dist.world_size() * grad_accum)) if keep_best
        else None, checkpoint_every_s=parse_duration(checkpoint_every), on_progress=on_progress)
    if windows:
        next_batch = lambda: batch_at(train_tokens, windows.take(bsz), block, dev)  # noqa: E731
    else:
        next_batch = lambda: get_batch(train_tokens, bsz, block, sampler, dev)  # noqa: E731
    loss_fn = causal_lm_loss
    if is_encoder(cfg):  # masked-LM pretraining: same loop, other batches, loss and evaluation
        next_batch, loss_fn, eval_fn = encoders.mlm_task(tok, train_tokens, bsz, block, sampler, dev,
                                                         windows.take if windows else None)
    if compile:
        # The loss, not just the model: the final norm, LM head and cross-entropy then fuse with the rest (2 CPU
        # cores, 180 s benchmark shape, interleaved A/B: 1.27x eager per step vs 1.18x compiling the model alone;
        # within the host's spread in bench_throughput.py, docs/benchmarks.md). Evaluation keeps the eager module
        # (it would otherwise compile a second, no-grad graph).
        loss_fn = torch.compile(loss_fn)
    state = fit(train_model, optimizer, next_batch, loss_fn, budget, fit_cfg, state,
                evaluate=evaluate if len(val_tokens) else None, checkpoint=checkpoint, log=log)  # --val-fraction 0

    # 5. final: the best weights (by held-out loss), full held-out evaluation, checkpoint, model folder, plot, card
    stopped_early = bool(state.last_eval.get("stop"))
    if keep_best and early.last_step != state.step:  # the last weights may be the best: score them too
        evaluate(unwrap(model))
    checkpoint(state)  # after that evaluation, so a resumed run knows the best loss the folder holds
    if keep_best and dist.is_main() and early.best_step != state.step:
        load_saved_weights(model, out)
        print(early.report(stopped_early, state.step))
    final, temperature = {}, 1.0
    if calibrate and dist.is_main() and len(val_tokens) >= MIN_CALIBRATION_TOKENS and not is_encoder(cfg):
        from slmkit.infer.evaluate import fit_temperature
        from slmkit.model.folder import scale_logits

        temp, before, after = fit_temperature(model, val_tokens, block, dev, eval_autocast)
        if after < before - 1e-4 and scale_logits(model, 1.0 / temp):
            temperature = temp
            save_model(model, out)  # the checkpoint keeps the uncalibrated weights a --resume continues from
            log({"kind": "calibration", "temperature": temp, "loss_before": before, "loss_after": after})
            print(f"calibrated: logits / {temp:g} (held-out loss {before:.4f} -> {after:.4f}, fitted on that split; "
                  "--no-calibrate to keep them as trained)")
    if dist.is_main():
        final = eval_fn(model, val_tokens, block, token_bytes, max_windows=4_000_000 // block, device=dev,
                        autocast_dtype=eval_autocast) if len(val_tokens) else {}
        log({"kind": "final", **final, "step": state.step, "tokens": state.tokens,
             "eval_tokens": final.get("tokens", 0), "train_seconds": state.train_seconds})
        _write_folder_extras(out, tok, cfg)
        plot_loss(read_metrics(metrics_path), out / "loss.png", title=f"{out.name}: {preset_name}")
    summary = {"out": str(out), "preset": preset_name, "parameters": n_params, "step": state.step,
               "tokens_seen": state.tokens, "train_seconds": state.train_seconds,
               "tokens_per_s": state.tokens / max(1e-9, state.train_seconds), "final_eval": final,
               "interrupted": state.last_eval.get("interrupted", False), "best_step": early.best_step,
               "stopped_early": stopped_early, "logit_temperature": temperature}
    if dist.is_main():
        card = {**summary, "model_type": cfg.get("model_type", "llama"), "layers": cfg.get("num_hidden_layers",
                cfg.get("num_layers")), "hidden_size": cfg["hidden_size"], "heads": cfg.get("num_attention_heads",
                cfg.get("num_heads")), "block_size": block, "tokenizer": _tokenizer_kind(args), "vocab_size": vocab,
                "data": [str(f) for f in files], "corpus_tokens": int(meta["tokens"]), "corpus_bytes": meta["bytes"],
                "val_fraction": len(val_tokens) / len(all_tokens) if not args.get("eval_data") else 0.0,
                "eval_data": args.get("eval_data"), "batch_size": bsz * dist.world_size(),
                "grad_accum": grad_accum, "lr": peak_lr, "weight_decay": args["weight_decay"],
                "dropout": args["dropout"], "dropout_start": args["dropout_start"], "sampling": args["sampling"],
                "device": dev,
                "dtype": precision_name(autocast_dtype)}
        atomic_write_json(out / "training_summary.json", card)
        write_model_card(out, card)
        if final:
            print(f"held-out: loss {final['loss']:.4f} | perplexity {final['perplexity']:.2f} | "
                  f"bits/byte {final['bits_per_byte']:.4f} | {state.step:,} steps, {state.tokens:,} tokens in "
                  f"{state.train_seconds:.0f} s ({summary['tokens_per_s']:,.0f} tok/s)")
        if summary["interrupted"]:
            print(f"interrupted: checkpoint saved; continue with: slm train --data ... --out {out} --resume")
        print(f"model folder: {out}")
    dist.teardown()
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


def _tokenizer_kind(args: dict) -> str:
    return f"from {args['tokenizer_from']}" if args.get("tokenizer_from") else (
        {"bpe": "byte-level BPE", "wordpiece": "WordPiece"}.get(args["tokenizer"], "bytes"))


def _get_tokenizer(args: dict, files, out: Path, n_bytes: int, preset_name: str, resume: bool):
    from slmkit import distributed as dist
    from slmkit.data.corpus import iter_documents
    from slmkit.model.presets import PRESETS
    from slmkit.model.tokenizer import byte_tokenizer, load_tokenizer, train_bpe, train_wordpiece

    if resume:
        return load_tokenizer(out)
    if not dist.is_main():  # rank 0 trains and saves it; the others wait, then read the saved copy
        dist.barrier()
        return load_tokenizer(out)
    if args.get("tokenizer_from"):
        tok = load_tokenizer(Path(args["tokenizer_from"]))
    elif args["tokenizer"] == "byte":
        tok = byte_tokenizer()
    elif args["tokenizer"] in ("bpe", "wordpiece"):
        vocab = args["vocab_size"] or recipe.auto_vocab_size(n_bytes, PRESETS[preset_name]["hidden_size"])
        print(f"training a {_tokenizer_kind(args)} tokenizer ({vocab:,} tokens) on {n_bytes:,} bytes")
        docs = _cap_bytes(iter_documents(files, args["text_col"]), 256 << 20)
        tok = train_bpe(docs, vocab) if args["tokenizer"] == "bpe" else train_wordpiece(docs, vocab, args["lowercase"])
    else:
        raise SystemExit(f"error: unknown --tokenizer {args['tokenizer']!r}; use bpe, byte or wordpiece")
    tok.save_pretrained(out)
    dist.barrier()
    return tok


def _cap_bytes(texts, limit: int):
    """BPE statistics converge long before a huge corpus ends: train on its first LIMIT bytes."""
    seen = 0
    for t in texts:
        yield t
        seen += len(t)
        if seen >= limit:
            return


def _write_folder_extras(out: Path, tok, cfg: dict) -> None:
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
           "do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "max_new_tokens": 200}
    atomic_write_json(out / "generation_config.json", gen)


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
