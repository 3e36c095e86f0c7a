"""Federate: one model trained across data silos with Flower, the text never leaving its silo (`slm federate`).

    local.py  a client's side of a round without Flower: its tokens, local training (training/fit.py), evaluation
    apps.py   the Flower ClientApp and ServerApp (Message API), strategies, DP wrapper, the message recorder
    grid.py   an in-process Grid: the same apps, every client in this process (`simulate`)
    run.py    the verb's stages: settings, per-round model folders, resume, federation.json and the card
    deploy.py a real deployment: Flower's SuperLink (`server`) and SuperNodes (`client`) around the same apps
    cli.py    the flags
"""

# the aggregation rules `--strategy` names (apps.make_strategy builds them); here, so --help needs no Flower import
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedavgm")
