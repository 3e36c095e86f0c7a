"""The Flower apps of `slm federate`, on flwr's Message API: a ClientApp that trains and evaluates on its own silo
(local.py: the training pipeline's loop), and a ServerApp that aggregates with a Flower strategy (FedAvg, FedProx,
FedAdam; optionally wrapped for differential privacy) and hands each round's global weights to a callback.

What a client sends back, and all the server ever receives from it (tests/federate records every message):
    train     ArrayRecord "arrays": the model's parameters after local training (float32)
              MetricRecord "metrics": train_loss, tokens, seconds, num-examples (the aggregation weight: tokens
              trained; 1 under differential privacy, whose accountant needs equal weights)
    evaluate  MetricRecord "metrics": eval_loss, bits_per_byte, num-examples (held-out tokens scored)
No text, no token ids, no gradients of single examples. Under --dp the update is clipped on the client
(flwr's fixedclipping_mod) and the server adds Gaussian noise to the aggregate (flwr's client-side-clipping wrapper).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from slmkit.federate.local import (
    RoundPlan,
    Silo,
    evaluate_silo,
    flat_optimizer_state,
    nested_optimizer_state,
    open_silo,
    train_round,
)
from slmkit.federate.vocab import SETUP
from slmkit.training.fit import get_lr


@dataclass
class FedSettings:
    """Everything both apps need; plain data (a deployment passes it as JSON in the run configuration)."""
    model_config: dict
    tokenizer: str | None  # a model folder whose tokenizer every client uses; None: raw bytes
    rounds: int
    local_steps: int
    batch: int
    block: int
    lr: float
    base: str | None = None  # fine-tune this model folder instead of training model_config from scratch
    lora: dict | None = None  # with base: LoRA adapters (r, alpha, dropout) are all that trains and travels
    min_lr_ratio: float = 0.1
    weight_decay: float | None = None  # None: slm train's rule for the passes this client makes over its text
    optimizer: str = "adamw"  # "muon": `slm train`'s default for decoders from scratch
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float | None = None  # FedAdam's eta (default 0.01), FedAvgM's server learning rate (default 1.0)
    server_momentum: float = 0.9  # FedAvgM
    dp_noise: float | None = None  # noise multiplier; None: no differential privacy
    dp_clip: float = 1.0  # L2 bound of a client's update
    dp_delta: float = 1e-5
    clients: int = 2
    min_clients: int = 2
    timeout: float = 600.0
    seed: int = 0
    eval_tokens: int = 32768
    eval_every: int = 1  # rounds between the clients' held-out evaluations (the last round is always evaluated)
    val_fraction: float = 0.1
    text_col: str = "text"  # the text field of every client's JSONL/CSV/Parquet
    replace_errors: bool = False  # clients substitute U+FFFD for undecodable bytes instead of failing
    device: str = "cpu"
    autocast: str | None = None  # "bf16" or None
    secagg: bool = False  # SecAgg+ (secagg.py): the server sees only the sum of the clients' weights
    secagg_shares: float = 1.0  # SecAgg+: the share of a round's clients each client's secrets are split among
    secagg_threshold: float = 0.67  # SecAgg+: the share of those holders needed to unmask (dropouts tolerated)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FedSettings:
        return cls(**json.loads(text))


# -- weights <-> records ----------------------------------------------------------------------------------------
def to_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in weights.items()})


def model_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The trainable parameters as float32 arrays: every weight, or a LoRA run's adapters (the frozen base never
    travels; buffers such as rotary tables are rebuilt, never sent)."""
    return {n: p.detach().float().cpu().numpy() for n, p in model.named_parameters() if p.requires_grad}


def build(s: FedSettings) -> torch.nn.Module:
    """The model both sides train: MODEL_CONFIG from scratch, the BASE folder, or the base with LoRA adapters."""
    from slmkit.model.folder import build_model

    if s.base is None:
        return build_model(dict(s.model_config))
    if s.lora is None:
        from slmkit.infer.load import load_model

        return load_model(Path(s.base)).train()
    from slmkit.training.config import LoraConfig
    from slmkit.training.finetune import lora_model

    return lora_model(Path(s.base), LoraConfig(**s.lora), s.seed)[0]


def load_weights(model: torch.nn.Module, record: ArrayRecord | dict[str, np.ndarray]) -> None:
    """The trainable parameters from RECORD (an ArrayRecord, or name -> array)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(record.keys()) != set(params):
        raise ValueError(f"the global weights do not fit this model ({len(record.keys())} arrays for "
                         f"{len(params)} parameters)")
    with torch.no_grad():
        for name, arr in record.items():
            arr = arr.numpy() if isinstance(arr, Array) else arr
            params[name].copy_(torch.from_numpy(np.asarray(arr, dtype=np.float32)))


def nbytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


def content_bytes(content: RecordDict) -> int:
    """The arrays' bytes, and the byte strings of config records (SecAgg+'s masked vectors, keys and shares)."""
    n = sum(nbytes(a) for a in content.array_records.values())
    for record in content.config_records.values():
        for v in record.values():
            n += len(v) if isinstance(v, (bytes, str)) else sum(len(b) for b in v if isinstance(b, bytes)) \
                if isinstance(v, list) else 0
    return n


# -- the client -------------------------------------------------------------------------------------------------
_CACHE: dict = {}  # per process: one model skeleton per configuration, one Silo per (data, tokenizer, block)


def _client_parts(s: FedSettings, context: Context) -> tuple[torch.nn.Module, Silo]:
    from slmkit.model.presets import is_encoder
    from slmkit.model.tokenizer import byte_tokenizer, load_tokenizer

    key = json.dumps([s.model_config, s.base, s.lora], sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = build(s).to(s.device)
    data = str(context.node_config["data-path"])
    skey = (data, s.tokenizer, s.block, s.val_fraction, s.text_col, s.replace_errors)
    if skey not in _CACHE:
        tok = load_tokenizer(Path(s.tokenizer)) if s.tokenizer else byte_tokenizer()
        _CACHE[skey] = open_silo(data.split(","), tok, s.block, s.val_fraction, s.text_col, s.replace_errors,
                                 is_encoder(s.model_config))
    return _CACHE[key], _CACHE[skey]


def _autocast(s: FedSettings):
    return torch.bfloat16 if s.autocast == "bf16" else None


def _optimizer_state(model: torch.nn.Module, s: FedSettings, context: Context, weight_decay: float) -> dict | None:
    """This client's optimizer state (AdamW moments, Muon momentum) from its last round, or None in its first."""
    from slmkit.training.optim import make_optimizer

    if "optimizer" not in context.state.array_records:
        return None
    flat = {k: v.numpy() for k, v in context.state.array_records["optimizer"].items()}
    template = make_optimizer(model, s.lr, weight_decay, s.device, s.optimizer).state_dict()
    return nested_optimizer_state(flat, template)


def _weight_decay(s: FedSettings, silo: Silo) -> float:
    """--weight-decay, or `slm train`'s rule (recipe.weight_decay_for) for the passes this client makes over its own
    training text in the whole run (more passes, more decay); fine-tuning (--base) keeps 0.1."""
    from slmkit.training import recipe

    if s.weight_decay is not None or s.base is not None:
        return 0.1 if s.weight_decay is None else s.weight_decay
    return recipe.weight_decay_for(s.rounds * s.local_steps * s.batch * s.block / max(1, len(silo.train)))


def local_train(s: FedSettings, context: Context, weights, rnd: int, prox_mu: float = 0.0
                ) -> tuple[dict[str, np.ndarray], dict]:
    """One round on this client: WEIGHTS (the global ones) trained on its silo -> (new weights, figures). ROUND is
    1-based over the whole run (resumed runs included): it anneals the learning rate and seeds the batches."""
    model, silo = _client_parts(s, context)
    load_weights(model, weights)
    lr = get_lr(rnd - 1, (rnd - 1) / max(1, s.rounds - 1), s.lr, 0, s.min_lr_ratio)  # cosine across rounds
    seed = s.seed * 1_000_003 + rnd * 1009 + int(context.node_config.get("partition-id", 0))
    wd = _weight_decay(s, silo)
    plan = RoundPlan(s.local_steps, lr, s.batch, s.block, seed, wd, prox_mu, optimizer=s.optimizer)
    r = train_round(model, silo, plan, s.device, _autocast(s), _optimizer_state(model, s, context, wd))
    # the moments stay on the client, in its node's state (it persists across rounds, in Flower's SuperNode too)
    context.state["optimizer"] = ArrayRecord({k: Array(v) for k, v in flat_optimizer_state(
        r["optimizer_state"]).items()})
    weight = 1 if s.dp_noise is not None or s.secagg else r["tokens"]  # DP's accountant, SecAgg+: equal weights
    return model_weights(model), {"train_loss": r["train_loss"], "tokens": r["tokens"], "seconds": r["seconds"],
                                  "num-examples": weight}


def local_evaluate(s: FedSettings, context: Context, weights) -> dict:
    """WEIGHTS scored on this client's held-out part -> {"eval_loss", "bits_per_byte", "num-examples"}."""
    model, silo = _client_parts(s, context)
    load_weights(model, weights)
    r = evaluate_silo(model, silo, s.block, s.eval_tokens, s.device, _autocast(s))
    return {"eval_loss": float(r["loss"]), "bits_per_byte": float(r.get("bits_per_byte") or 0.0),
            "num-examples": int(r["tokens"])}


def make_client_app(s: FedSettings) -> ClientApp:
    if s.secagg:
        from slmkit.federate.secagg import make_secagg_client_app

        return make_secagg_client_app(s, local_train, local_evaluate, lambda context: list(
            model_weights(_client_parts(s, context)[0])))
    app = ClientApp()

    # per handler, not app-wide: the clipping mod reads the train message's config and would fail evaluations
    @app.train(mods=[fixedclipping_mod] if s.dp_noise is not None else [])
    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        weights, metrics = local_train(s, context, msg.content["arrays"], int(cfg["round"]),
                                       float(cfg.get("proximal-mu", 0.0)))
        return Message(RecordDict({"arrays": to_record(weights), "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        metrics = local_evaluate(s, context, msg.content["arrays"])
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


# -- the server -------------------------------------------------------------------------------------------------
class Float32:
    """A strategy whose new global weights are float32 again (flwr 1.42's FedAdam and FedAvgM return float64:
    twice the bytes next round)."""

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = ArrayRecord({k: Array(v.numpy().astype(np.float32)) for k, v in arrays.items()})
        return arrays, metrics


class Float32FedAdam(Float32, FedAdam):
    pass


class Float32FedAvgM(Float32, FedAvgM):
    pass


def make_strategy(s: FedSettings, on_evaluate: Callable[[MetricRecord], None], accountant_state: dict | None = None):
    def evaluate_aggr(records, key):  # flwr's own (weighted mean) rule, its result also handed to ON_EVALUATE
        out = aggregate_metricrecords(records, key)
        on_evaluate(out)
        return out

    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=s.min_clients,
                  min_evaluate_nodes=s.min_clients, min_available_nodes=s.min_clients,
                  evaluate_metrics_aggr_fn=evaluate_aggr)
    if s.strategy == "fedavg":
        strategy = FedAvg(**common)
    elif s.strategy == "fedprox":
        strategy = FedProx(**common, proximal_mu=s.proximal_mu)
    elif s.strategy == "fedavgm":
        strategy = Float32FedAvgM(**common, server_learning_rate=s.server_lr or 1.0,
                                  server_momentum=s.server_momentum)
    else:
        strategy = Float32FedAdam(**common, eta=s.server_lr or 0.01, eta_l=s.lr, tau=1e-6)
    if s.dp_noise is None:
        return strategy
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    accountant = RdpAccountant(PrivacyConfig(target_delta=s.dp_delta, population_size=s.clients,
                                             neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                             sampling_method=SamplingMethod.NO_AMPLIFICATION))
    if accountant_state:  # a resumed run: the releases so far still count
        accountant.load_state_dict(accountant_state)
    wrapped = DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier=s.dp_noise, clipping_norm=s.dp_clip,
                                                         num_sampled_clients=s.clients, accountant=accountant)
    wrapped.slm_accountant = accountant
    return wrapped


def _reason(reply: Message) -> str:
    """The first line of a failed reply's reason."""
    return ((reply.error.reason or "").strip().splitlines() or ["no reason given"])[0]


class Recorder:
    """Wraps a Grid's send_and_receive: bytes each way, every reply's sender and content kinds (the audit), and the
    per-client metrics of the last call of each kind."""

    def __init__(self, grid: Grid, audit: list | None = None, timeout: float | None = None,
                 setup: ConfigRecord | None = None):
        self.audit, self.timeout = audit, timeout  # TIMEOUT: for callers that give none (flwr's legacy workflows)
        self.setup = setup  # a deployment's final settings and tokenizer (vocab.SETUP), added to every message
        self.sent = self.received = 0
        self.per_client: dict[str, dict[int, dict]] = {}
        self.original = grid.send_and_receive
        grid.send_and_receive = self  # the strategy calls the grid's method: it now goes through here

    def __call__(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        if self.setup is not None:
            for m in messages:
                m.content.config_records[SETUP] = self.setup
        self.sent += sum(content_bytes(m.content) for m in messages)
        replies = list(self.original(messages, timeout=self.timeout if timeout is None else timeout))
        failed = [r for r in replies if r.has_error()]
        if failed and len(failed) == len(replies):  # nothing to aggregate: say why instead of a round over 0 clients
            raise SystemExit(f"error: every client failed its {messages[0].metadata.message_type} round; the first "
                             f"said: {_reason(failed[0])}")
        for r in failed:  # the round goes on with the others; the failure is not hidden
            print(f"warning: client {r.metadata.src_node_id} failed its {r.metadata.message_type} round: "
                  f"{_reason(r)}", file=sys.stderr)
        for r in replies:
            if r.has_error():
                continue
            self.received += content_bytes(r.content)
            m = r.content.metric_records.get("metrics")  # (SecAgg+'s replies: secagg.py collects the figures)
            if m is not None:
                self.per_client.setdefault(r.metadata.message_type, {})[r.metadata.src_node_id] = dict(m)
            if self.audit is not None:
                self.audit.append(r)
        return replies


def make_server_app(s: FedSettings, initial: dict[str, np.ndarray], start_round: int,
                    after_round: Callable[[int, ArrayRecord, dict], None], audit: list | None = None,
                    accountant_state: dict | None = None, setup: ConfigRecord | None = None) -> ServerApp:
    """AFTER_ROUND(round, global arrays, figures) runs after each round's evaluation; figures: the clients' mean
    held-out metrics ("evaluate"), per-client metrics, bytes each way, ε and the accountant's state under DP."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        recorder = Recorder(grid, audit, s.timeout, setup)
        latest: dict = {}
        strategy = make_strategy(s, lambda m: latest.update(evaluate=dict(m)), accountant_state)

        def on_round(flwr_round: int, arrays: ArrayRecord):
            if flwr_round == 0:
                return None  # the starting weights: nothing trained yet
            rnd = start_round + flwr_round - 1
            spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
            figures = {"evaluate": latest.pop("evaluate", {}), "clients": dict(recorder.per_client),
                       "bytes_sent": recorder.sent, "bytes_received": recorder.received,
                       "epsilon": None if spent is None else float(spent.epsilon),
                       "accountant": strategy.slm_accountant.state_dict() if spent is not None else None}
            recorder.per_client.clear()  # (the same dict: secagg.py's strategy fills it)
            recorder.sent = recorder.received = 0
            after_round(rnd, arrays, figures)
            return None

        if s.secagg:
            from slmkit.federate.secagg import run_secagg

            run_secagg(grid, context, s, initial, start_round, recorder.per_client, latest, on_round, to_record)
            return
        train_config = ConfigRecord({"round": start_round})
        rounds = s.rounds - start_round + 1
        # the round number travels in the config; flwr counts from 1 in every start(), so it is advanced per round
        original_configure = strategy.configure_train

        def configure_train(server_round, arrays, config, grid_):
            config["round"] = start_round + server_round - 1
            return original_configure(server_round, arrays, config, grid_)

        strategy.configure_train = configure_train
        original_evaluate = strategy.configure_evaluate

        def configure_evaluate(server_round, arrays, config, grid_):
            rnd = start_round + server_round - 1  # every eval_every rounds, and always the last one
            if rnd % s.eval_every and rnd != s.rounds:
                return []  # no messages: this round's clients only train
            return original_evaluate(server_round, arrays, config, grid_)

        strategy.configure_evaluate = configure_evaluate
        strategy.start(grid=grid, initial_arrays=to_record(initial), num_rounds=rounds, timeout=s.timeout,
                       train_config=train_config, evaluate_fn=on_round)

    return app
