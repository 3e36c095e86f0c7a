"""A real deployment of `slm federate`: Flower's SuperLink (the server side's endpoint), SuperNodes (one per client
machine) and the same apps as `simulate`, run by Flower's own processes.

    slm federate server --out DIR --rounds R --min-clients N --port P
        starts `flower-superlink` on HOST:P, then `flwr run` of a generated Flower App (a pyproject.toml and a
        two-line module pointing at SERVER_APP / CLIENT_APP below, the run's settings in its config); waits for the
        rounds, stops the SuperLink, exits 0 with the model folder in DIR.
    slm federate client --data PATH --server HOST:P
        starts `flower-supernode` connected to HOST:P with this machine's data path; exits when the server says the
        run is over (a "query.finish" message), or with an error when the SuperNode dies.

Every client machine needs slmkit installed (the generated app imports it) and its own data; nothing else is copied.
Security: anyone who can reach the SuperLink's port can submit a Flower App to it, which its nodes then run; the
server binds to 127.0.0.1 unless --host says otherwise, and --ssl-* turn on TLS (docs/federate.md).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import partial
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

FINISH = "query.finish"

# -- the apps Flower runs (the generated app points at these two objects) ---------------------------------------
SERVER_APP = ServerApp()
CLIENT_APP = ClientApp()
_CLIENTS: dict[str, ClientApp] = {}  # settings JSON -> the client app made for them (one per run per process)


def _decode(text: str) -> dict:
    return json.loads(base64.b64decode(text).decode())


def _encode(obj: dict) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()  # no quoting issues inside TOML


@SERVER_APP.main()
def _server(grid: Grid, context: Context) -> None:
    from slmkit.federate.apps import make_server_app
    from slmkit.federate.run import FederateConfig, finish, prepare

    raw = _decode(str(context.run_config["slm-config"]))
    cfg = FederateConfig(**{**raw, "out": Path(raw["out"]),
                            "tokenizer_from": Path(raw["tokenizer_from"]) if raw.get("tokenizer_from") else None})
    gather, setup = None, None
    if cfg.tokenizer_from_clients:  # ask the connected clients for their counts; then every message carries the result
        gather = partial(_gather_deployed, grid, cfg)
    settings, weights, state, start, writer, tok = prepare(cfg, clients=cfg.min_clients, gather=gather)
    if cfg.tokenizer_from_clients:
        from flwr.app import ConfigRecord

        from slmkit.federate.vocab import pack_folder

        setup = ConfigRecord({"settings": _encode(json.loads(settings.to_json())),
                              "tokenizer": pack_folder(cfg.tokenizer_from)})
    make_server_app(settings, weights, start, writer, accountant_state=state.get("accountant"),
                    setup=setup)(grid, context)
    finish(cfg, settings, state, tok)
    # the clients' SuperNodes would wait for more work forever: tell each that the run is over
    grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type=FINISH) for n in grid.get_node_ids()],
                          timeout=30)


def _gather_deployed(grid: Grid, cfg):
    from slmkit.federate.vocab import gather_tokenizer, wait_for_nodes
    from slmkit.model.presets import build_config, is_encoder

    wait_for_nodes(grid, cfg.min_clients, cfg.timeout)
    return gather_tokenizer(grid, cfg.vocab_min_count, cfg.vocab_words, cfg.vocab_size,
                            build_config(cfg.preset, 256)["hidden_size"],
                            "wordpiece" if is_encoder(cfg.preset) else "bpe", timeout=cfg.timeout)


def _client_for(msg: Message, context: Context) -> ClientApp:
    """The client app for this run's settings: the run configuration's, or under --tokenizer-from-clients the
    final ones the server adds to every message (with the tokenizer it built)."""
    from slmkit.federate.apps import FedSettings, make_client_app
    from slmkit.federate.vocab import SETUP, unpack_folder

    setup = msg.content.config_records.get(SETUP)
    key = str(setup["settings"]) if setup is not None else str(context.run_config["slm-settings"])
    if key not in _CLIENTS:
        s = FedSettings(**_decode(key))
        if setup is not None:
            s.tokenizer = str(unpack_folder(str(setup["tokenizer"]), Path(tempfile.gettempdir())))
        else:
            s.tokenizer = context.node_config.get("tokenizer-dir") or s.tokenizer
        s.device = "cpu"
        _CLIENTS[key] = make_client_app(s)
    return _CLIENTS[key]


@CLIENT_APP.train()
def _train(msg: Message, context: Context) -> Message:
    return _client_for(msg, context)(msg, context)


@CLIENT_APP.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _client_for(msg, context)(msg, context)


@CLIENT_APP.query("words")
def _words(msg: Message, context: Context) -> Message:
    from slmkit.federate.apps import FedSettings
    from slmkit.federate.vocab import words_handler

    s = FedSettings(**_decode(str(context.run_config["slm-settings"])))
    return words_handler(s.text_col, s.replace_errors, s.val_fraction)(msg, context)


@CLIENT_APP.query("finish")
def _finish(msg: Message, context: Context) -> Message:
    done = context.node_config.get("done-file")
    if done:
        Path(str(done)).write_text("done\n")
    return Message(RecordDict(), reply_to=msg)


# -- `slm federate server` --------------------------------------------------------------------------------------
APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "slmfederate"
version = "1.0.0"
description = "generated by slm federate server"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "slmkit"

[tool.flwr.app.components]
serverapp = "slm_federate_app:server_app"
clientapp = "slm_federate_app:client_app"

[tool.flwr.app.config]
slm-config = "{config}"
slm-settings = "{settings}"
"""
# plain assignments: `flwr run` finds the apps by reading this module, not by importing it
APP_MODULE = "import slmkit.federate.deploy\n\nserver_app = slmkit.federate.deploy.SERVER_APP\n" \
             "client_app = slmkit.federate.deploy.CLIENT_APP\n"


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(path).exists():
        raise SystemExit(f"error: {name} not found: pip install -e \".[federate]\" installs Flower's commands")
    return path


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when the slm process that started it dies, even by SIGKILL or a
    crash, whose `finally` never runs: a SuperNode or SuperLink must not outlive its `slm federate` (an orphaned
    SuperNode would go on polling, and could join a later run with this machine's data)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_healthy(url: str, proc: subprocess.Popen, what: str, seconds: float = 60.0) -> None:
    import ssl

    # the probe only asks whether our own child process is listening yet (nothing is sent): under TLS it need not
    # verify the certificate, which names the server's public host and may be signed by a private CA
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    t0 = time.time()
    while time.time() - t0 < seconds:
        if proc.poll() is not None:
            raise SystemExit(f"error: {what} exited with code {proc.returncode}; is the port taken?")
        try:
            urllib.request.urlopen(url, timeout=1, context=context)
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"error: {what} did not come up within {seconds:.0f} s")


def serve(cfg, host: str = "127.0.0.1", port: int = 9092, ssl: dict | None = None) -> dict:
    """Run the federation's server side for CFG (a FederateConfig without data); returns the summary."""
    from slmkit.federate.run import RUN_FILE, check, open_run

    check(cfg)
    *_, settings = open_run(cfg, clients=cfg.min_clients)  # OUT checked, the settings clients will use
    cfg.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="slm-federate-"))
    app, home = work / "app", work / "flwr_home"
    app.mkdir()
    home.mkdir()
    raw = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}
    raw.update(resume=cfg.resume, overwrite=False)  # open_run() above already cleared OUT when asked
    (app / "pyproject.toml").write_text(APP_TOML.format(config=_encode(raw), settings=_encode(
        json.loads(settings.to_json()))))
    (app / "slm_federate_app.py").write_text(APP_MODULE)
    tls = ssl or {}
    conn = f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n'
    conn += f'root-certificates = "{tls["ca"]}"\n' if tls.get("ca") else "insecure = true\n"
    (home / "config.toml").write_text(conn)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1"}
    link_cmd = [_tool("flower-superlink"), "--host", host, "--port", str(port),
                "--disable-runtime-dependency-installation"]
    link_cmd += ["--ssl-certfile", tls["cert"], "--ssl-keyfile", tls["key"]] + (
        ["--ssl-ca-certfile", tls["ca"]] if tls.get("ca") else []) if tls.get("cert") else ["--insecure"]
    link = subprocess.Popen(link_cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "superlink.log", "w"),
                            preexec_fn=_die_with_parent)
    try:
        scheme = "https" if tls.get("cert") else "http"
        _wait_healthy(f"{scheme}://127.0.0.1:{port}/health", link, "flower-superlink")
        print(f"SuperLink on {host}:{port}: waiting for {cfg.min_clients} clients (slm federate client --data PATH "
              f"--server HOST:{port})", flush=True)
        rc = subprocess.call([_tool("flwr"), "run", str(app), "local", "--stream"], env=env)
    finally:
        link.send_signal(signal.SIGTERM)
        try:
            link.wait(30)
        except subprocess.TimeoutExpired:
            link.kill()
    summary_path = cfg.out / RUN_FILE
    if rc != 0 or not summary_path.is_file():
        raise SystemExit(f"error: the federation did not finish (flwr run exited {rc}); logs in {work}")
    shutil.rmtree(work, ignore_errors=True)
    return json.loads(summary_path.read_text())


# -- `slm federate client` --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(data: list[str], server: str, tokenizer_from: Path | None = None, root_certificates: Path | None = None,
         grace: float = 3.0) -> int:
    """Run a SuperNode for DATA against SERVER (HOST:PORT) until the run is over; returns 0 when it ended normally."""
    for d in data:
        if not Path(d).exists():
            raise SystemExit(f"error: --data {d}: no such file or folder")
    work = Path(tempfile.mkdtemp(prefix="slm-federate-client-"))
    done = work / "done"
    node = {"data-path": ",".join(str(Path(d).resolve()) for d in data), "done-file": str(done)}
    if tokenizer_from:
        node["tokenizer-dir"] = str(Path(tokenizer_from).resolve())
    node_config = " ".join(f'{k}="{v}"' for k, v in node.items())
    cmd = [_tool("flower-supernode"), "--superlink", server, "--port", str(_free_port()), "--node-config",
           node_config]
    cmd += ["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "supernode.log", "w"),
                            preexec_fn=_die_with_parent)
    print(f"joined {server} with {node['data-path']}; training when the server asks", flush=True)
    try:
        while not done.exists():
            if proc.poll() is not None:
                raise SystemExit(f"error: flower-supernode exited with code {proc.returncode} before the run ended; "
                                 f"log: {work / 'supernode.log'}")
            time.sleep(0.5)
        time.sleep(grace)  # let the SuperNode deliver its reply to the finish message
        print("the server says the run is over", flush=True)
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
