"""Verb `federate simulate`: one model trained across data silos with Flower, every silo's text staying where it is.

    open_output -> tokenizer (shared: --tokenizer-from, or raw bytes) -> model config and starting weights
      -> Flower: the ServerApp (a strategy over the clients) and one ClientApp per silo (local.py's training),
         in this process through grid.LocalGrid
      -> after every round: OUT/last/ (the global weights and the run's state: --resume continues from it) and,
         when the clients' mean held-out loss improves, OUT itself (model folder + tokenizer + card)
      -> federation.json: settings, every round's figures, bytes moved, ε under --dp

Budget: --tokens N is the training tokens summed over all clients and rounds (as `slm train --tokens` counts them):
each client trains N / (rounds x clients x batch x block) steps per round; or --local-steps K directly.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from slmkit.files import atomic_write_json
from slmkit.model.presets import is_encoder
from slmkit.training.stages import cleans_up, open_output

RUN_FILE = "federation.json"
LAST = "last"
CLIENTS_TOKENIZER = "clients-tokenizer"


@dataclass
class FederateConfig:
    data: list[str]  # one entry per client: a path (several: comma-separated)
    out: Path
    rounds: int = 10
    preset: str = "slm-1m"
    base: Path | None = None  # fine-tune this model folder (full, or --lora) instead of a preset from scratch
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    tokenizer_from: Path | None = None
    tokenizer_from_clients: bool = False  # BPE built from the clients' word counts (vocab.py)
    vocab_size: int | None = None
    vocab_min_count: int = 5
    vocab_words: int = 20000
    tokens: int | None = None
    local_steps: int | None = None
    batch_size: int | None = None
    block_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None  # default: muon for a decoder from scratch (as slm train), adamw for --base
    weight_decay: float | None = None  # None: slm train's rule, per client (its passes over its own text)
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float | None = None
    server_momentum: float = 0.9
    dp: bool = False
    dp_noise: float = 1.0
    dp_epsilon: float | None = None  # a target ε after --rounds: sets dp_noise
    dp_clip: float = 1.0
    dp_delta: float = 1e-5
    secagg: bool = False  # SecAgg+ (secagg.py)
    secagg_shares: float = 1.0
    secagg_threshold: float = 0.67
    min_clients: int | None = None
    timeout: float = 600.0
    val_fraction: float = 0.1
    eval_tokens: int = 32768  # held-out tokens each client scores per round
    eval_every: int = 1  # rounds between evaluations
    text_col: str = "text"  # every client's text field/column (JSONL, CSV, Parquet)
    replace_errors: bool = False  # clients replace undecodable bytes instead of failing
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    resume: bool = False
    overwrite: bool = False
    drop: list[int] = field(default_factory=list)  # simulate: clients (0-based) that never answer


def settings_for(cfg: FederateConfig, tok, dev: str, clients: int):
    """FedSettings from the command line: the model's config, shapes, learning rate and per-round steps."""
    from slmkit.federate.apps import FedSettings
    from slmkit.hardware import pick_dtype
    from slmkit.model.presets import build_config
    from slmkit.training import recipe

    if cfg.base is not None:  # fine-tuning: the folder's architecture; shapes as `slm finetune` picks them
        from slmkit.infer.load import read_config
        from slmkit.model.folder import refuse_quantized

        model_cfg = read_config(cfg.base)
        refuse_quantized(cfg.base, model_cfg)
        block, step_tokens = recipe.shape_for(model_cfg, dev)
        block = cfg.block_size or min(block, 512)
    else:
        block, step_tokens = recipe.shape_for(build_config(cfg.preset, len(tok)), dev)
        block = cfg.block_size or block
        model_cfg = build_config(cfg.preset, len(tok), block_size=block)
        model_cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    batch = cfg.batch_size or max(1, step_tokens // block)
    steps = cfg.local_steps or (max(1, cfg.tokens // (cfg.rounds * clients * batch * block)) if cfg.tokens else 20)
    autocast = pick_dtype(cfg.dtype, dev, model_cfg["hidden_size"])
    llama = model_cfg.get("model_type", "llama") == "llama"
    optimizer = cfg.optimizer or ("muon" if cfg.base is None and llama else "adamw")
    lora = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": 0.0} if cfg.lora else None
    tokenizer = cfg.tokenizer_from or cfg.base
    return FedSettings(model_config=model_cfg, tokenizer=str(tokenizer) if tokenizer else None,
                       base=str(cfg.base.resolve()) if cfg.base else None, lora=lora,
                       rounds=cfg.rounds, local_steps=steps, batch=batch, block=block,
                       lr=cfg.lr or (2e-4 if cfg.base and not cfg.lora else 1e-3 if cfg.base else
                                     recipe.peak_lr(model_cfg["hidden_size"], optimizer)),
                       optimizer=optimizer, weight_decay=cfg.weight_decay, strategy=cfg.strategy,
                       proximal_mu=cfg.proximal_mu, server_lr=cfg.server_lr,
                       server_momentum=cfg.server_momentum, dp_noise=cfg.dp_noise if cfg.dp else None,
                       dp_clip=cfg.dp_clip, dp_delta=cfg.dp_delta, clients=clients, secagg=cfg.secagg,
                       secagg_shares=cfg.secagg_shares, secagg_threshold=cfg.secagg_threshold,
                       min_clients=cfg.min_clients or clients, timeout=cfg.timeout, seed=cfg.seed,
                       val_fraction=cfg.val_fraction, eval_tokens=cfg.eval_tokens, eval_every=cfg.eval_every,
                       text_col=cfg.text_col, replace_errors=cfg.replace_errors,
                       device=dev,
                       autocast="bf16" if autocast == torch.bfloat16 else None)


class RoundWriter:
    """After each round: OUT/last/ (weights + state.json), OUT (when the held-out loss improves), metrics.jsonl."""

    def __init__(self, cfg: FederateConfig, settings, tok, state: dict):
        from slmkit.federate.apps import build
        from slmkit.training.stages import Weights

        self.cfg, self.settings, self.tok, self.state = cfg, settings, tok, state
        self.adapter = None
        if settings.lora is not None:  # an adapter folder, as `slm finetune --lora` writes (slm merge folds it)
            from slmkit.training.config import LoraConfig
            from slmkit.training.finetune import lora_model

            self.model, fingerprint = lora_model(Path(settings.base), LoraConfig(**settings.lora), settings.seed)
            self.adapter = {"base_model": settings.base, "base_fingerprint": fingerprint, "task": "causal",
                            "created_by": "slm federate --lora"}
        else:
            self.model = build(settings)
        self.best, self.last = Weights(self.model, cfg.out, self.adapter), Weights(self.model, cfg.out / LAST,
                                                                                    self.adapter)
        self.t0 = time.perf_counter()

    def __call__(self, rnd: int, arrays, figures: dict) -> None:
        from slmkit.federate.apps import load_weights

        load_weights(self.model, arrays)
        out = self.cfg.out
        ev = figures["evaluate"]
        loss = ev.get("eval_loss")
        row = {"round": rnd, "eval_loss": loss, "bits_per_byte": ev.get("bits_per_byte"),
               "train_loss": _mean(figures["clients"].get("train", {}), "train_loss"),
               "tokens": sum(int(m.get("tokens", 0)) for m in figures["clients"].get("train", {}).values()),
               "clients_trained": len(figures["clients"].get("train", {})),
               "clients_evaluated": len(figures["clients"].get("evaluate", {})),
               "per_client_eval_loss": {str(k): m.get("eval_loss") for k, m in
                                        sorted(figures["clients"].get("evaluate", {}).items())},
               "bytes_sent": figures["bytes_sent"], "bytes_received": figures["bytes_received"],
               "epsilon": figures["epsilon"], "seconds": round(time.perf_counter() - self.t0, 2)}
        self.state["history"].append(row)
        if figures.get("accountant") is not None:
            self.state["accountant"] = figures["accountant"]  # --resume continues the privacy ledger
        self.state["round"] = rnd
        best = self.state.get("best")
        if loss is not None and math.isfinite(loss) and (best is None or loss < best["eval_loss"]):
            self.state["best"] = {"round": rnd, "eval_loss": loss}
            self.best.write()
            self.tok.save_pretrained(out)
        (out / LAST).mkdir(parents=True, exist_ok=True)
        self.last.write()
        atomic_write_json(out / LAST / "state.json", self.state)
        with open(out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        eps = f" | ε {row['epsilon']:.2f}" if row["epsilon"] is not None else ""
        print(f"round {rnd}/{self.settings.rounds}: held-out loss {_fmt(loss)} over {row['clients_evaluated']} "
              f"clients | train loss {_fmt(row['train_loss'])} | {row['tokens']:,} tokens | "
              f"{(row['bytes_sent'] + row['bytes_received']) / 2**20:.1f} MiB moved{eps}", flush=True)


def _mean(per_client: dict, key: str) -> float | None:
    vals = [float(m[key]) for m in per_client.values() if key in m]
    return sum(vals) / len(vals) if vals else None


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.4f}"


def open_run(cfg: FederateConfig, clients: int | None = None, gather=None) -> tuple:
    """OUT checked (or the resumed state read), the shared tokenizer and the settings both apps use ->
    (resumed state or None, tokenizer, device, settings). All `slm federate server` needs before Flower starts.
    GATHER: under --tokenizer-from-clients, a callable that asks the clients for their counts (vocab.py)."""
    from slmkit.hardware import pick_device
    from slmkit.model.tokenizer import byte_tokenizer, load_tokenizer

    saved = _resume_state(cfg) if cfg.resume else open_output(cfg.out, False, cfg.overwrite, RUN_FILE,
                                                               holds=("config.json", LAST), clear=True,
                                                               sources=[p for d in cfg.data for p in d.split(",")])
    if saved and saved["round"] >= cfg.rounds:
        raise SystemExit(f"error: --resume: {cfg.out} already ran {saved['round']} rounds; raise --rounds to go on")
    dev = pick_device(cfg.device)
    if cfg.tokenizer_from_clients and gather is not None:  # (a server's pre-flight has no clients to ask yet)
        cfg.tokenizer_from = clients_tokenizer(cfg, gather)
    shared = cfg.tokenizer_from or cfg.base
    tok = load_tokenizer(shared) if shared else byte_tokenizer()
    settings = settings_for(cfg, tok, dev, clients or len(cfg.data))
    placeholder = cfg.tokenizer_from_clients and gather is None  # (bytes until the server has asked its clients)
    if is_encoder(settings.model_config) and not placeholder:  # a masked LM needs [MASK]: refused here, once
        from slmkit.data.mlm import mask_info

        mask_info(tok, "pass --tokenizer-from-clients (a WordPiece built from the clients' word counts) or "
                       "--tokenizer-from a BERT-style folder")
    return saved, tok, dev, settings


def clients_tokenizer(cfg: FederateConfig, gather) -> Path:
    """OUT/clients-tokenizer: built once from the clients' word counts (a resumed run keeps it)."""
    folder = cfg.out / CLIENTS_TOKENIZER
    if not (folder / "tokenizer.json").is_file():
        tok, figures = gather()
        tok.save_pretrained(folder)
        atomic_write_json(folder / "statistics.json", figures)
        print(f"tokenizer from the clients' word counts: {figures['vocab_size']:,} tokens from "
              f"{figures['distinct_words']:,} distinct words ({figures['words_received']:,} counts received from "
              f"{figures['clients']} clients; no text)", flush=True)
    return folder


def gather_in_process(cfg: FederateConfig):
    """The word-count query to the simulated clients (in this process, as the rounds are)."""
    from flwr.clientapp import ClientApp

    from slmkit.federate.grid import FIRST_NODE, LocalGrid, set_identity
    from slmkit.federate.vocab import gather_tokenizer, words_handler
    from slmkit.model.presets import build_config

    app = ClientApp()
    app.query("words")(words_handler(cfg.text_col, cfg.replace_errors, cfg.val_fraction))
    grid = LocalGrid(app, [{"partition-id": i, "data-path": d} for i, d in enumerate(cfg.data)], {})
    grid.down = {FIRST_NODE + i for i in cfg.drop}
    set_identity()
    from slmkit.model.presets import is_encoder

    return gather_tokenizer(grid, cfg.vocab_min_count, cfg.vocab_words, cfg.vocab_size,
                            build_config(cfg.preset, 256)["hidden_size"],
                            "wordpiece" if is_encoder(cfg.preset) else "bpe")


def prepare(cfg: FederateConfig, clients: int | None = None, gather=None):
    """The stages before Flower: open_run, then the starting weights (the resumed ones) in the server's copy of the
    model -> (settings, weights, state, first round, writer, tokenizer)."""
    import logging

    from slmkit.federate.apps import model_weights

    logging.getLogger("flwr").setLevel(logging.WARNING)  # flwr logs every message at INFO; our lines say the round
    saved, tok, dev, settings = open_run(cfg, clients, gather)
    torch.manual_seed(cfg.seed)
    state = {"round": 0, "best": None, "history": [], "settings": json.loads(settings.to_json())}
    writer = RoundWriter(cfg, settings, tok, state)  # holds the server's copy of the model
    model = writer.model
    if saved:
        writer.last.restore()
        state = writer.state = saved
    start = state["round"] + 1
    cfg.out.mkdir(parents=True, exist_ok=True)
    what = f"{cfg.base.name}{' + LoRA' if cfg.lora else ''}" if cfg.base else cfg.preset
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mode = f"{cfg.strategy}{', dp' if cfg.dp else ''}{', secagg+' if cfg.secagg else ''}"
    print(f"federate ({mode}): {settings.clients} clients | {what} "
          f"{trained:,} parameters trained | rounds {start}-{cfg.rounds} x "
          f"{settings.local_steps} local steps of {settings.batch}x{settings.block} tokens | lr {settings.lr:g} | "
          f"{dev}", flush=True)
    return settings, model_weights(model), state, start, writer, tok


@cleans_up(LAST)
def simulate(cfg: FederateConfig, audit: list | None = None) -> dict:
    """The run with every client in this process (see the module docstring); AUDIT, when a list, receives every
    reply the server gets."""
    from slmkit.federate.apps import make_client_app, make_server_app
    from slmkit.federate.grid import FIRST_NODE, LocalGrid, run_in_process

    check(cfg)
    settings, weights, state, start, writer, tok = prepare(cfg, gather=lambda: gather_in_process(cfg))
    grid = LocalGrid(make_client_app(settings),
                     [{"partition-id": i, "data-path": d} for i, d in enumerate(cfg.data)], {})
    grid.down = {FIRST_NODE + i for i in cfg.drop}
    run_in_process(make_server_app(settings, weights, start, writer, audit, state.get("accountant")), grid, {})
    return finish(cfg, settings, state, tok)


def _resume_state(cfg: FederateConfig) -> dict:
    path = cfg.out / LAST / "state.json"
    if not path.is_file():
        raise SystemExit(f"error: --resume: {cfg.out} holds no {LAST}/state.json of a federated run; start "
                         "without --resume")
    state = json.loads(path.read_text())
    had_dp = bool(state["settings"].get("dp_noise"))
    if bool(cfg.dp or cfg.dp_epsilon) != had_dp:
        raise SystemExit(f"error: --resume: {cfg.out} was trained {'with' if had_dp else 'without'} --dp; resume it "
                         "the same way")
    return state


def noise_for_epsilon(epsilon: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier whose ROUNDS releases (Gaussian mechanism, every client in every round: no
    sampling amplification) stay within (EPSILON, DELTA): the RDP accountant flwr's wrapper reports with."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    def spent(sigma: float) -> float:
        acct = rdp_privacy_accountant.RdpAccountant()
        acct.compose(dp_event.GaussianDpEvent(sigma), rounds)
        return acct.get_epsilon(delta)

    lo, hi = 1e-2, 1e3
    for _ in range(60):  # bisection: spent() falls as sigma grows
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if spent(mid) > epsilon else (lo, mid)
    return hi


# (the flag, when it is read, what to do instead): given where it is not read, each is refused in one line
NOT_READ = (
    ("lora_r", lambda c: c.lora, "without --lora", "it sizes the adapters: add --lora (with --base)"),
    ("lora_alpha", lambda c: c.lora, "without --lora", "it scales the adapters: add --lora (with --base)"),
    ("preset", lambda c: c.base is None, "--base", "the base folder's architecture is trained"),
    ("tokenizer_from", lambda c: c.base is None, "--base", "the base folder's own tokenizer is used"),
    ("tokens", lambda c: c.local_steps is None, "--local-steps", "it sets the steps per round; give one of them"),
    ("proximal_mu", lambda c: c.strategy == "fedprox", "this --strategy", "it is FedProx's (--strategy fedprox)"),
    ("server_lr", lambda c: c.strategy in ("fedadam", "fedavgm"), "this --strategy",
     "it is FedAdam's and FedAvgM's server step"),
    ("server_momentum", lambda c: c.strategy == "fedavgm", "this --strategy", "it is FedAvgM's (--strategy fedavgm)"),
    *((k, lambda c: c.tokenizer_from_clients, "a run without --tokenizer-from-clients",
       "add --tokenizer-from-clients") for k in ("vocab_size", "vocab_min_count", "vocab_words")),
    ("dp_noise", lambda c: c.dp_epsilon is None, "--dp-epsilon", "the target epsilon picks the noise multiplier"),
    *((k, lambda c: c.dp or c.dp_epsilon is not None, "a run without --dp", "add --dp (or --dp-epsilon)")
      for k in ("dp_noise", "dp_clip", "dp_delta")),
    *((k, lambda c: c.secagg, "a run without --secagg", "add --secagg")
      for k in ("secagg_shares", "secagg_threshold")),
    ("timeout", lambda c: not c.data, "`slm federate simulate`",  # (a server's config has no data: clients bring it)
     "its clients run in this process and always reply; --timeout is the server's"),
)


def refuse_unused(cfg: FederateConfig) -> None:
    """One line for the first flag NOT_READ says this run would not read."""
    from slmkit.options import defaults_of
    from slmkit.options import refuse_unused as refuse

    defaults = defaults_of(FederateConfig)
    for name, read, where, instead in NOT_READ:
        if not read(cfg):
            refuse(where, vars(cfg), {name: instead}, defaults)


def check(cfg: FederateConfig) -> None:
    from slmkit.federate import STRATEGIES

    refuse_unused(cfg)
    if cfg.data and len(cfg.data) < 2:  # (a server has no data: its clients bring it)
        raise SystemExit("error: --data: give two or more silos (one path per client)")
    for d in cfg.data:
        for p in d.split(","):
            if not Path(p).exists():
                raise SystemExit(f"error: --data {p}: no such file or folder")
    if cfg.lora and cfg.base is None:
        raise SystemExit("error: --lora needs --base DIR (the model folder whose adapters the clients train)")
    if cfg.base is not None and not (Path(cfg.base) / "config.json").is_file():
        raise SystemExit(f"error: --base {cfg.base}: not a model folder (no config.json)")
    if cfg.base is not None:
        from slmkit.infer.load import read_config

        if is_encoder(read_config(Path(cfg.base))):
            raise SystemExit(f"error: --base {cfg.base} is an encoder: federated fine-tuning takes decoder folders; "
                             "encoders pretrain from scratch (--preset bert-tiny ... with --tokenizer-from-clients)")
    if cfg.strategy not in STRATEGIES:
        raise SystemExit(f"error: --strategy {cfg.strategy!r}: use one of {', '.join(STRATEGIES)}")
    if cfg.data and cfg.min_clients is not None and not 1 <= cfg.min_clients <= len(cfg.data):
        raise SystemExit(f"error: --min-clients {cfg.min_clients} must be 1-{len(cfg.data)} (the clients given)")
    if cfg.dp_epsilon is not None:
        if not cfg.dp_epsilon > 0:
            raise SystemExit(f"error: --dp-epsilon {cfg.dp_epsilon} must be positive")
        cfg.dp, cfg.dp_noise = True, noise_for_epsilon(cfg.dp_epsilon, cfg.rounds, cfg.dp_delta)
        print(f"--dp-epsilon {cfg.dp_epsilon:g} after {cfg.rounds} rounds at δ {cfg.dp_delta:g}: noise multiplier "
              f"{cfg.dp_noise:.3f}")
    if cfg.tokenizer_from_clients and (cfg.tokenizer_from or cfg.base):
        raise SystemExit("error: --tokenizer-from-clients builds the tokenizer for a model trained from scratch: not "
                         "with --tokenizer-from or --base")
    if cfg.tokenizer_from_clients and not (cfg.vocab_min_count >= 1 and cfg.vocab_words >= 1):
        raise SystemExit("error: --vocab-min-count and --vocab-words must be 1 or more")
    if cfg.secagg and (cfg.dp or cfg.strategy != "fedavg"):
        raise SystemExit("error: --secagg runs Flower's SecAgg+ workflow, which aggregates with FedAvg and without "
                         "--dp here: drop --dp / --strategy, or --secagg")
    if cfg.secagg and not (0 < cfg.secagg_shares <= 1 and 0 < cfg.secagg_threshold <= 1):
        raise SystemExit("error: --secagg-shares and --secagg-threshold are shares of the clients: give each in (0, 1]")
    if cfg.dp and not (cfg.dp_noise > 0 and cfg.dp_clip > 0 and 0 < cfg.dp_delta < 1):
        raise SystemExit("error: --dp-noise and --dp-clip must be positive, --dp-delta in (0, 1)")


def finish(cfg: FederateConfig, settings, state: dict, tok) -> dict:
    hist = state["history"]
    summary = {"out": str(cfg.out), "mode": "simulate" if cfg.data else "server", "clients": settings.clients,
               "rounds": state["round"],
               "strategy": cfg.strategy, "best": state.get("best"), "final_eval_loss": hist[-1]["eval_loss"] if hist
               else None, "tokens": sum(r["tokens"] for r in hist),
               "bytes_per_round": int(np.mean([r["bytes_sent"] + r["bytes_received"] for r in hist])) if hist else 0,
               "epsilon": hist[-1]["epsilon"] if hist else None, "delta": cfg.dp_delta if cfg.dp else None,
               "settings": state["settings"], "config": {k: str(v) if isinstance(v, Path) else v
                                                         for k, v in asdict(cfg).items()},
               "history": hist}
    atomic_write_json(cfg.out / RUN_FILE, summary)
    if state.get("best"):
        write_card(cfg, summary)
        print(f"model folder: {cfg.out} (round {summary['best']['round']}: held-out loss "
              f"{summary['best']['eval_loss']:.4f}, the clients' mean)", flush=True)
    return summary


def write_card(cfg: FederateConfig, s: dict) -> None:
    best = s["best"]
    row = next(r for r in s["history"] if r["round"] == best["round"])
    name = (lambda k: f"client {int(k) - 1000}") if s["mode"] == "simulate" else (lambda k: f"node {k}")
    per = ", ".join(f"{name(k)}: {v:.4f}" for k, v in row["per_client_eval_loss"].items() if v is not None)
    dp = (f"Differential privacy: update clipping to {cfg.dp_clip:g} on each client, Gaussian noise (multiplier "
          f"{cfg.dp_noise:g}) on the aggregate: ε = {s['epsilon']:.2f} at δ = {cfg.dp_delta:g} after "
          f"{s['rounds']} rounds (client level).\n" if cfg.dp else "No differential privacy.\n")
    dp += ("Secure aggregation (SecAgg+): the server saw only the sum of the clients' weights in every round.\n"
           if cfg.secagg else "")
    kind = "masked-LM encoder" if is_encoder(s["settings"]["model_config"]) else "decoder"
    text = (f"# {cfg.out.name}\n\nA {cfg.preset} {kind} trained with `slm federate {s['mode']}` across {s['clients']} "
            f"data silos ({cfg.strategy}); no silo's text left it.\n\n- rounds: {s['rounds']} (best: round "
            f"{best['round']})\n- held-out loss, the clients' mean: {best['eval_loss']:.4f} ({per})\n"
            f"- training tokens, all clients: {s['tokens']:,}\n- bytes moved per round (both ways): "
            f"{s['bytes_per_round'] / 2**20:.1f} MiB\n\n{dp}")
    (cfg.out / "README.md").write_text(text)
