"""`slm federate`'s flags: `simulate` runs every silo's client in this process through Flower."""

from __future__ import annotations

from pathlib import Path

from slmkit.federate import STRATEGIES
from slmkit.options import check_numbers, parse_count

SIMULATE = """Train one model across data silos with Flower (flwr's Message API): each client trains a few local steps
from the global weights on its own text, the server aggregates (FedAvg, FedProx or FedAdam) and evaluates the result
on every client's held-out part. Only weights and figures travel; OUT gets the best global model after each round,
OUT/last the latest (for --resume), federation.json every round's figures."""
SERVER = """The server side of a real federation: a Flower SuperLink on HOST:PORT that `slm federate client`
processes on other machines join, and the same ServerApp as `simulate`. Rounds start once --min-clients have joined;
a client that drops out of a round is left out of it (after --timeout) and a late one joins the next. Exits 0 when
the rounds are done, the model folder in OUT."""
CLIENT = """A client of `slm federate server`: a Flower SuperNode that trains on this machine's --data when the server
asks and sends back only weights and figures. Exits when the server's run is over."""


def main(command: str, **options) -> dict:
    """Federated training with Flower. `simulate`: every client in this process, one data path each."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise SystemExit('error: slm federate needs Flower: pip install -e ".[federate]" (Python 3.11 or later)') \
            from None
    from slmkit.federate.run import FederateConfig, simulate

    if command == "client":
        from slmkit.federate.deploy import join

        raise SystemExit(join(**options))
    check_numbers(options, positive={"rounds": "federated rounds", "eval_tokens": "held-out tokens per round",
                                     "eval_every": "rounds between evaluations",
                                     "local_steps": "steps per client per round",
                                     "dp_noise": "the noise multiplier",
                                     "dp_epsilon": "the target epsilon", "dp_clip": "the update's L2 bound",
                                     "timeout": "seconds to wait for a round's replies",
                                     "server_lr": "FedAdam's server step", "proximal_mu": "FedProx's weight"})
    options["tokens"] = parse_count(options.get("tokens"))
    options = {k: v for k, v in options.items() if v is not None}
    if command == "server":
        from slmkit.federate.deploy import serve

        net = {k: options.pop(k) for k in ("host", "port") if k in options}
        ssl = {k: str(options.pop(f"ssl_{k}")) for k in ("cert", "key", "ca") if f"ssl_{k}" in options}
        if bool(ssl.get("cert")) != bool(ssl.get("key")):
            raise SystemExit("error: --ssl-cert and --ssl-key go together (the server's certificate and its key)")
        return serve(FederateConfig(data=[], **options), ssl=ssl, **net)
    options["data"] = [str(d) for d in options["data"]]
    return simulate(FederateConfig(**options))


def add_args(p) -> None:
    sub = p.add_subparsers(dest="command", required=True, metavar="{simulate,server,client}")
    s = sub.add_parser("simulate", help="every client in this process (one --data path each)", description=SIMULATE)
    s.add_argument("--data", nargs="+", required=True, help="one path per client (a file or folder; several files of "
                   "one client: comma-separated)")
    s.add_argument("--out", type=Path, required=True, help="the model folder to write")
    _training_args(s)
    g = s.add_argument_group("simulation")
    g.add_argument("--min-clients", type=int, help="replies a round needs (default: every client)")
    v = sub.add_parser("server", help="a Flower SuperLink that clients on other machines join", description=SERVER)
    v.add_argument("--out", type=Path, required=True, help="the model folder to write")
    v.add_argument("--min-clients", type=int, required=True, help="clients a round waits for (and trains)")
    g = v.add_argument_group("network")
    g.add_argument("--port", type=int, help="the port clients connect to (default: 9092)")
    g.add_argument("--host", help="the address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface: "
                   "only on a trusted network, with TLS)")
    g.add_argument("--ssl-cert", type=Path, help="TLS: the server's certificate (PEM)")
    g.add_argument("--ssl-key", type=Path, help="TLS: its private key (PEM)")
    g.add_argument("--ssl-ca", type=Path, help="TLS: the CA certificate that signed it")
    _training_args(v)
    c = sub.add_parser("client", help="join a server with this machine's data", description=CLIENT)
    c.add_argument("--data", nargs="+", required=True, help="this client's text (files or folders)")
    c.add_argument("--server", required=True, help="HOST:PORT of `slm federate server`")
    c.add_argument("--tokenizer-from", type=Path, metavar="DIR", help="this machine's copy of the tokenizer folder "
                   "the server was given (when it was given one)")
    c.add_argument("--root-certificates", type=Path, help="TLS: the CA certificate the server's was signed by")


def _training_args(s) -> None:
    g = s.add_argument_group("the model and its budget")
    g.add_argument("--preset", help="the architecture trained from scratch (default: slm-1m)")
    g.add_argument("--tokenizer-from", type=Path, metavar="DIR", help="a model folder whose tokenizer every client "
                   "uses (default: raw bytes, so no statistics of any client's text are needed)")
    g.add_argument("--tokenizer-from-clients", action="store_true", default=None, help="build the tokenizer (BPE; "
                   "WordPiece for encoders) from word counts the clients send before round 1 (their frequent words "
                   "and counts only; docs/federate.md) instead of raw bytes")
    g.add_argument("--vocab-size", type=int, help="with --tokenizer-from-clients: the vocabulary (default: by the "
                   "clients' text size, as slm train)")
    g.add_argument("--vocab-min-count", type=int, help="with --tokenizer-from-clients: a client sends only words it "
                   "holds at least this often (default: 5)")
    g.add_argument("--vocab-words", type=int, help="with --tokenizer-from-clients: at most this many of a client's "
                   "most frequent words (default: 20000)")
    g.add_argument("--base", type=Path, metavar="DIR", help="fine-tune this model folder instead of a preset from "
                   "scratch (every client needs the same folder at the same path); its tokenizer is used")
    g.add_argument("--lora", action="store_true", default=None, help="with --base: train LoRA adapters only; only "
                   "they travel, and OUT is an adapter folder (slm merge folds it into the base)")
    g.add_argument("--lora-r", type=int, help="the adapters' rank (default: 8)")
    g.add_argument("--lora-alpha", type=float, help="the adapters' scale numerator (default: 16)")
    g.add_argument("--rounds", type=int, help="federated rounds (default: 10)")
    g.add_argument("--tokens", help="training tokens summed over all clients and rounds, e.g. 2M (sets the local "
                   "steps)")
    g.add_argument("--local-steps", type=int, help="optimizer steps per client per round (default: 20)")
    g.add_argument("--batch-size", type=int, help="sequences per step (default: the recipe's)")
    g.add_argument("--block-size", type=int, help="tokens per sequence (default: the recipe's)")
    g.add_argument("--lr", type=float, help="peak learning rate, annealed over the rounds (default: by width)")
    g.add_argument("--optimizer", choices=["adamw", "muon"], help="each client's optimizer, its state kept on the "
                   "client between rounds (default: muon from scratch, as slm train; adamw with --base)")
    g.add_argument("--weight-decay", type=float, help="decoupled weight decay (default: slm train's rule, on each "
                   "client for the passes it makes over its own text; 0.1 with --base)")
    g.add_argument("--val-fraction", type=float, help="each client's held-out share (default: 0.1)")
    g.add_argument("--eval-tokens", type=int, help="held-out tokens each client scores per round (default: 32768)")
    g.add_argument("--text-col", help="every client's text field/column for JSONL, CSV, Parquet (default: text)")
    g.add_argument("--replace-errors", action="store_true", default=None, help="clients replace undecodable bytes "
                   "of text files instead of failing")
    g.add_argument("--eval-every", type=int, help="rounds between the clients' held-out evaluations, the last round "
                   "always evaluated; the best model is chosen among evaluated rounds (default: 1)")
    g = s.add_argument_group("aggregation")
    g.add_argument("--strategy", choices=STRATEGIES, help="FedAvg (default), "
                   "FedProx (a proximal term keeps unlike clients close), FedAdam (Adam steps on the server), FedAvgM "
                   "(momentum on the server)")
    g.add_argument("--proximal-mu", type=float, help="FedProx's mu (default: 0.01)")
    g.add_argument("--server-lr", type=float, help="the server's step: FedAdam's eta (default: 0.01), FedAvgM's "
                   "learning rate (default: 1.0)")
    g.add_argument("--server-momentum", type=float, help="FedAvgM's momentum (default: 0.9)")
    g.add_argument("--timeout", type=float, help="server: seconds to wait for a round's replies (default: 600)")
    g = s.add_argument_group("differential privacy (client level)")
    g.add_argument("--dp", action="store_true", default=None, help="clip each client's update, add Gaussian noise to "
                   "the aggregate, report ε per round")
    g.add_argument("--dp-noise", type=float, help="noise multiplier sigma (default: 1.0)")
    g.add_argument("--dp-epsilon", type=float, help="target ε after --rounds rounds: picks the noise multiplier "
                   "(implies --dp)")
    g.add_argument("--dp-clip", type=float, help="L2 bound of a client's update (default: 1.0)")
    g.add_argument("--dp-delta", type=float, help="δ of the (ε, δ) guarantee (default: 1e-5)")
    g = s.add_argument_group("secure aggregation")
    g.add_argument("--secagg", action="store_true", default=None, help="SecAgg+ (Flower's): each client masks its "
                   "weights so that the server can unmask only their sum; FedAvg only, not with --dp")
    g.add_argument("--secagg-shares", type=float, help="the share of a round's clients that each client's secrets "
                   "are split among (default: 1.0; smaller for large cohorts)")
    g.add_argument("--secagg-threshold", type=float, help="the share of those holders needed to unmask: the dropouts "
                   "a round survives (default: 0.67)")
    g = s.add_argument_group("the run")
    g.add_argument("--seed", type=int, help="weights, batches (default: 0)")
    g.add_argument("--device", help="cpu, cuda, auto (default: auto)")
    g.add_argument("--dtype", help="auto, fp32, bf16 (default: auto)")
    g.add_argument("--resume", action="store_true", default=None, help="continue from OUT/last")
    g.add_argument("--overwrite", action="store_true", default=None, help="replace an existing OUT")
