"""Secure aggregation for `slm federate --secagg`: the server learns the mean of the clients' weights and nothing about
any one client's. The protocol is Flower's SecAgg+ (Bell et al. 2020; `SecAggPlusWorkflow` on the server,
`secaggplus_mod` on each client), which flwr 1.42 offers on its legacy strategy API only; so under --secagg both
apps speak that API, around the same local training and evaluation as the Message-API apps (apps.local_train,
apps.local_evaluate) and with the same per-round bookkeeping (apps.make_server_app's ON_ROUND).

What the server receives from a client in a SecAgg+ round, stage by stage:
    setup            two public keys
    share keys       the client's secrets split into Shamir shares, each encrypted for one peer (the server relays
                     them and cannot read them)
    masked vectors   the client's weights clipped to +-clipping range (8.0), quantized to 2^22 levels and masked with
                     pairwise and private noise that cancels only in the sum over clients; its figures (train_loss,
                     tokens, seconds) in the clear
    unmask           the shares the server needs to remove the masks of the sum (and of clients that dropped out)
Evaluation replies are as without --secagg: each client's held-out loss in the clear.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

CLIPPING_RANGE = 8.0  # SecAggPlusWorkflow's default: a weight outside +-8 is clipped before masking


def make_secagg_client_app(s, local_train: Callable, local_evaluate: Callable, names_of: Callable):
    """A ClientApp whose train messages go through Flower's SecAgg+ client mod; LOCAL_TRAIN, LOCAL_EVALUATE: apps.py's,
    NAMES_OF(context): the trained parameters' names, in the order the server's arrays come."""
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod

    class SiloClient(NumPyClient):
        def __init__(self, node):
            self.node = node  # the node's Context: its state keeps the optimizer's moments across rounds
            self.names = names_of(node)

        def fit(self, parameters, config):
            weights, metrics = local_train(s, self.node, dict(zip(self.names, parameters, strict=True)),
                                           int(config["round"]))
            biggest = max(float(np.abs(w).max()) for w in weights.values())
            if biggest > CLIPPING_RANGE:  # SecAgg+ would clip it silently
                print(f"warning: a weight of {biggest:.1f} is outside SecAgg+'s range of +-{CLIPPING_RANGE:g}; it "
                      "is clipped in the aggregate", file=sys.stderr)
            return [weights[n] for n in self.names], 1, metrics

        def evaluate(self, parameters, config):
            m = local_evaluate(s, self.node, dict(zip(self.names, parameters, strict=True)))
            return m["eval_loss"], m["num-examples"], {"eval_loss": m["eval_loss"],
                                                       "bits_per_byte": m["bits_per_byte"]}

    return ClientApp(client_fn=lambda context: SiloClient(context).to_client(), mods=[secaggplus_mod])


def legacy_strategy(s, initial: dict[str, np.ndarray], start_round: int, per_client: dict, latest: dict):
    """flwr's legacy FedAvg (what SecAggPlusWorkflow drives) with the Message-API path's habits: equal client
    weights, the round number in the train config, held-out evaluation every s.eval_every rounds, each client's
    figures in PER_CLIENT and the clients' weighted mean held-out figures in LATEST["evaluate"]."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import FedAvg

    class SecAggFedAvg(FedAvg):
        def configure_evaluate(self, server_round, parameters, client_manager):
            rnd = start_round + server_round - 1  # every eval_every rounds, and always the last one
            if rnd % s.eval_every and rnd != s.rounds:
                return []
            return super().configure_evaluate(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            per_client["train"] = {proxy.node_id: dict(res.metrics) for proxy, res in results}
            return super().aggregate_fit(server_round, results, failures)

        def aggregate_evaluate(self, server_round, results, failures):
            per_client["evaluate"] = {proxy.node_id: dict(res.metrics) for proxy, res in results}
            n = sum(res.num_examples for _, res in results)
            if n:
                latest["evaluate"] = {k: sum(res.num_examples * float(res.metrics[k]) for _, res in results) / n
                                      for k in ("eval_loss", "bits_per_byte")}
            return super().aggregate_evaluate(server_round, results, failures)

    return SecAggFedAvg(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=s.min_clients,
                        min_evaluate_clients=s.min_clients, min_available_clients=s.min_clients,
                        on_fit_config_fn=lambda r: {"round": start_round + r - 1},
                        fit_metrics_aggregation_fn=lambda _: {}, evaluate_metrics_aggregation_fn=lambda _: {},
                        initial_parameters=ndarrays_to_parameters(list(initial.values())))


def run_secagg(grid, context, s, initial: dict[str, np.ndarray], start_round: int, per_client: dict, latest: dict,
               on_round: Callable, to_record: Callable) -> None:
    """The rounds start_round..s.rounds over GRID with SecAgg+ in every training round; ON_ROUND(flwr round,
    TO_RECORD(the new global weights)) after each round's evaluation."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
    from flwr.server.workflow.default_workflows import default_evaluate_workflow

    names = list(initial)

    def evaluate_then_report(grid_, ctx) -> None:
        trained = bool(per_client.get("train"))
        default_evaluate_workflow(grid_, ctx)
        if not trained:
            print("warning: secure aggregation halted this round (too few clients answered to unmask the sum); the "
                  "global weights are unchanged", file=sys.stderr)
        params = compat.arrayrecord_to_parameters(ctx.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        arrays = dict(zip(names, parameters_to_ndarrays(params), strict=True))
        on_round(int(ctx.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]), to_record(arrays))

    strategy = legacy_strategy(s, initial, start_round, per_client, latest)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=s.rounds - start_round + 1),
                           strategy=strategy)
    fit = SecAggPlusWorkflow(num_shares=float(s.secagg_shares), reconstruction_threshold=float(s.secagg_threshold),
                             max_weight=1.0, clipping_range=CLIPPING_RANGE, timeout=s.timeout)
    DefaultWorkflow(fit_workflow=fit, evaluate_workflow=evaluate_then_report)(grid, legacy)
