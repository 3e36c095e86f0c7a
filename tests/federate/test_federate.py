"""`slm federate simulate` on tiny silos: rounds, what the server receives, dropped clients, resume, DP, strategies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from slmkit.federate.local import RoundPlan, open_silo, proximal, train_round  # noqa: E402
from slmkit.federate.run import FederateConfig, simulate  # noqa: E402

TINY = dict(preset="slm-tiny", local_steps=2, batch_size=4, block_size=32, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def silos(tmp_path_factory, corpus):
    """Three silos cut from the test corpus (tests/conftest.py), each its own stretch of text."""
    d = tmp_path_factory.mktemp("silos")
    text = corpus.read_text() if corpus.is_file() else "".join(p.read_text() for p in sorted(corpus.glob("*.txt")))
    n = len(text) // 3
    paths = []
    for i in range(3):
        (d / f"silo{i}.txt").write_text(text[i * n:(i + 1) * n])
        paths.append(str(d / f"silo{i}.txt"))
    return paths


def run(tmp_path, silos, name="m", **kw):
    return simulate(FederateConfig(data=kw.pop("data", silos[:2]), out=tmp_path / name, **{**TINY, **kw}))


def test_rounds_write_the_best_model_and_every_rounds_figures(tmp_path, silos):
    s = run(tmp_path, silos, rounds=3)
    out = tmp_path / "m"
    assert [r["round"] for r in s["history"]] == [1, 2, 3] and s["clients"] == 2
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "federation.json",
                 "last/model.safetensors", "last/state.json"):
        assert (out / name).is_file(), name
    losses = [r["eval_loss"] for r in s["history"]]
    assert losses[-1] < losses[0]  # training across silos lowers the clients' held-out loss
    assert s["best"]["eval_loss"] == min(losses)
    row = s["history"][0]
    assert set(row["per_client_eval_loss"]) == {"1000", "1001"} and row["clients_trained"] == 2
    params = sum(p.numel() for p in __import__("slmkit.infer.load", fromlist=["x"]).load_model(out).parameters())
    assert row["bytes_sent"] >= 2 * 2 * 4 * params  # train + evaluate messages to 2 clients, float32
    # only train replies carry weights (each array serialised with a small header)
    assert 2 * 4 * params <= row["bytes_received"] < 1.01 * 2 * 4 * params
    assert row["tokens"] == 2 * 2 * 4 * 32  # clients x steps x batch x block
    assert "held-out loss" in (out / "README.md").read_text()


def test_the_server_receives_weights_and_figures_only(tmp_path, silos):
    audit: list = []
    simulate(FederateConfig(data=silos[:2], out=tmp_path / "m", rounds=1, **TINY), audit)
    assert len(audit) == 4  # 2 clients x (train, evaluate)
    from slmkit.infer.load import load_model

    names = {n for n, _ in load_model(tmp_path / "m").named_parameters()}
    for reply in audit:
        content = reply.content
        assert not content.config_records  # no strings of any kind
        for record in content.array_records.values():
            assert set(record.keys()) == names  # exactly the model's parameters...
            assert all(a.dtype == "float32" for a in record.values())  # ...as floats: no token ids
        for metrics in content.metric_records.values():
            assert set(metrics) <= {"train_loss", "tokens", "seconds", "num-examples", "eval_loss", "bits_per_byte"}
            assert all(isinstance(v, (int, float)) for v in metrics.values())


def test_secure_aggregation_matches_fedavg_and_the_server_sees_only_masked_weights(tmp_path, silos):
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import Key
    from safetensors.torch import load_file

    run(tmp_path, silos, name="plain", data=silos, rounds=1)
    audit: list = []
    sec = simulate(FederateConfig(data=silos, out=tmp_path / "sec", rounds=1, secagg=True, **TINY), audit)
    assert sec["history"][0]["clients_trained"] == 3 and sec["history"][0]["clients_evaluated"] == 3
    assert "SecAgg+" in (tmp_path / "sec" / "README.md").read_text()  # the model card says so
    # the unmasked sum is FedAvg's mean (equal token counts), up to SecAgg+'s quantization (16 / 2^22 per weight)
    a, b = (load_file(tmp_path / name / "last" / "model.safetensors") for name in ("plain", "sec"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert any(not torch.equal(a[k], b[k]) for k in a)  # (and it did go through the quantized path)
    masked = []
    for reply in audit:
        assert all(len(record) == 0 for record in reply.content.array_records.values())  # no weight in the clear
        stage = reply.content.config_records.get("secaggplus_configs", {})
        masked += [bytes_to_ndarray(x) for x in stage.get(Key.MASKED_PARAMETERS, [])]
    from slmkit.infer.load import load_model

    n_arrays = len(list(load_model(tmp_path / "sec").parameters())) + 1  # (+ SecAgg+'s weighting factor)
    assert len(masked) == 3 * n_arrays  # each client's weights, masked: values spread over the whole modulus
    values = np.concatenate([m.ravel() for m in masked]).astype(np.float64)
    quantized_alone = 2**22  # an unmasked weight would sit in [0, 2^22]
    assert (values > 4 * quantized_alone).mean() > 0.95


def test_a_tokenizer_built_from_the_clients_word_counts(tmp_path, silos):
    from slmkit.federate.vocab import client_words
    from slmkit.model.tokenizer import load_tokenizer

    text = open(silos[0]).read()
    mine = tmp_path / "mine.txt"
    mine.write_text("Zyxwvutsr met Zyxwvutsr.\n" + text + " Qqqqqqq" * 50)  # a rare word; a word only held out
    answer = client_words([str(mine)], "text", False, 0.1, 5, 20000)
    assert set(answer) == {"words", "counts", "bytes"}  # all that leaves the client
    assert "Ġthe" in answer["words"] and min(answer["counts"]) >= 5
    assert not any("Zyxwvutsr" in w or "Qqqqqqq" in w for w in answer["words"])
    assert client_words([str(mine)], "text", False, 0.1, 5, 10)["words"] == answer["words"][:10]

    s = run(tmp_path, silos, rounds=1, tokenizer_from_clients=True, vocab_size=320)
    out = tmp_path / "m"
    stats = json.loads((out / "clients-tokenizer" / "statistics.json").read_text())
    assert stats["clients"] == 2 and stats["vocab_size"] == 320
    tok = load_tokenizer(out)
    assert len(tok) == 320 == json.loads((out / "config.json").read_text())["vocab_size"]
    ids = tok(text[:2000])["input_ids"]
    assert len(ids) < 0.8 * len(text[:2000].encode())  # merges learned: fewer tokens than bytes
    assert tok.decode(ids, skip_special_tokens=True) == text[:2000]
    assert s["history"][0]["eval_loss"] is not None
    with pytest.raises(SystemExit, match="--tokenizer-from-clients"):
        run(tmp_path, silos, name="m2", rounds=1, tokenizer_from_clients=True, tokenizer_from=out)


def test_an_encoder_from_scratch_with_a_wordpiece_from_the_clients(tmp_path, silos):
    """A masked-LM encoder pretrained across silos (full weights travel), its WordPiece built from the clients'
    counts; the folder is an ordinary encoder folder. Raw bytes (no [MASK]) are refused before any work."""
    from transformers import AutoModelForMaskedLM

    from slmkit.model.tokenizer import load_tokenizer

    kw = dict(TINY, preset="bert-tiny", block_size=32)
    with pytest.raises(SystemExit, match=r"no \[MASK\] token.*--tokenizer-from-clients"):
        simulate(FederateConfig(data=silos[:2], out=tmp_path / "bytes", rounds=1, **kw))
    s = simulate(FederateConfig(data=silos[:2], out=tmp_path / "enc", rounds=2, tokenizer_from_clients=True,
                                vocab_size=400, **kw))
    losses = [r["eval_loss"] for r in s["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] < 7.0  # masked-token loss, falling
    tok = load_tokenizer(tmp_path / "enc")
    assert tok.mask_token == "[MASK]" and len(tok) == 400
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "enc")
    assert model.config.model_type == "bert" and model.config.vocab_size == 400
    assert "masked-LM encoder" in (tmp_path / "enc" / "README.md").read_text()
    with pytest.raises(SystemExit, match="is an encoder: federated fine-tuning takes decoder folders"):
        simulate(FederateConfig(data=silos[:2], out=tmp_path / "ft", rounds=1, base=tmp_path / "enc"))


def test_a_failing_client_does_not_stop_the_run(tmp_path, silos):
    bad = tmp_path / "tiny.txt"
    bad.write_text("too short")  # this client fails in every round (its silo is too small to train on)
    s = run(tmp_path, silos, data=silos[:2] + [str(bad)], rounds=2, min_clients=2)
    assert [r["clients_trained"] for r in s["history"]] == [2, 2]
    s = run(tmp_path, silos, name="m2", data=silos, rounds=1, min_clients=2, drop=[2])  # a client that never answers
    assert s["history"][0]["clients_trained"] == 2


def test_eval_every_skips_evaluations_but_not_the_last_round(tmp_path, silos):
    s = run(tmp_path, silos, rounds=3, eval_every=2)
    assert [r["clients_evaluated"] for r in s["history"]] == [0, 2, 2]  # rounds 2 and 3 (the last)
    assert s["best"]["round"] in (2, 3) and s["history"][0]["eval_loss"] is None


def test_resume_continues_the_rounds(tmp_path, silos):
    run(tmp_path, silos, rounds=2)
    with pytest.raises(SystemExit, match="already holds a model; pass --resume"):
        run(tmp_path, silos, rounds=2)
    s = run(tmp_path, silos, rounds=3, resume=True)
    assert [r["round"] for r in s["history"]] == [1, 2, 3]
    lines = (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3]


def test_differential_privacy_adds_noise_and_reports_epsilon(tmp_path, silos):
    plain = run(tmp_path, silos, name="plain", rounds=2)
    dp = run(tmp_path, silos, name="dp", rounds=2, dp=True, dp_noise=1.0, dp_clip=0.5)
    eps = [r["epsilon"] for r in dp["history"]]
    assert eps[0] > 0 and eps[1] > eps[0]  # the guarantee weakens with every release
    assert plain["history"][0]["epsilon"] is None
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "plain" / "last" / "model.safetensors"), load_file(tmp_path / "dp" / "last" /
                                                                                     "model.safetensors")
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    assert "ε =" in (tmp_path / "dp" / "README.md").read_text()
    from slmkit.federate.run import noise_for_epsilon

    sigma = noise_for_epsilon(8.0, 2, 1e-5)  # --dp-epsilon: the noise that spends exactly that over the rounds
    s = run(tmp_path, silos, name="dp8", rounds=2, dp_epsilon=8.0)
    assert s["history"][-1]["epsilon"] == pytest.approx(8.0, rel=1e-3) and 0.5 < sigma < 5
    # a resumed run keeps the privacy ledger: round 2 after a resume spends what round 2 of one run spent
    run(tmp_path, silos, name="dp-r", rounds=1, dp=True, dp_noise=1.0, dp_clip=0.5)
    with pytest.raises(SystemExit, match="was trained with --dp"):
        run(tmp_path, silos, name="dp-r", rounds=2, resume=True)
    r = run(tmp_path, silos, name="dp-r", rounds=2, resume=True, dp=True, dp_noise=1.0, dp_clip=0.5)
    assert r["history"][-1]["epsilon"] == pytest.approx(eps[1], rel=1e-6)


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam", "fedavgm"])
def test_other_strategies(tmp_path, silos, strategy):
    s = run(tmp_path, silos, rounds=2, strategy=strategy)
    assert len(s["history"]) == 2 and all(np.isfinite(r["eval_loss"]) for r in s["history"])


def test_the_proximal_term_pulls_towards_the_round_start(silos):
    from slmkit.model.folder import build_model
    from slmkit.model.presets import build_config
    from slmkit.model.tokenizer import byte_tokenizer
    from slmkit.training.losses import causal_lm_loss

    tok = byte_tokenizer()
    silo = open_silo([silos[0]], tok, 32)
    drift = {}
    for mu in (0.0, 10.0):
        torch.manual_seed(0)
        model = build_model(build_config("slm-tiny", len(tok), block_size=32))
        start = [p.detach().clone() for p in model.parameters()]
        train_round(model, silo, RoundPlan(steps=5, lr=3e-3, batch=4, block=32, seed=0, prox_mu=mu))
        drift[mu] = sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(model.parameters(), start, strict=True))
    assert drift[10.0] < drift[0.0]
    model = build_model(build_config("slm-tiny", len(tok), block_size=32))
    x = torch.randint(0, 256, (2, 8))
    loss = proximal(causal_lm_loss, model, 1.0)
    assert torch.allclose(loss(model, x, x), causal_lm_loss(model, x, x))  # no drift yet: the plain loss


def test_a_deployment_on_loopback_with_two_client_processes(tmp_path, silos):
    """`slm federate server` (Flower's SuperLink + the ServerApp) and two `slm federate client` processes (SuperNodes),
    as on three machines: the tokenizer is built from the clients' word counts and reaches them in the messages,
    the rounds run, the clients exit when told, the server exits 0 with the model folder."""
    import os
    import subprocess
    import sys

    from tiny_server import free_port

    port = free_port()
    slm = [sys.executable, "-m", "slmkit", "federate"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(slm + ["server", "--out", str(tmp_path / "m"), "--min-clients", "2", "--rounds", "2",
                                     "--local-steps", "2", "--preset", "slm-tiny", "--block-size", "32",
                                     "--batch-size", "4", "--dtype", "fp32", "--port", str(port),
                                     "--tokenizer-from-clients", "--vocab-size", "300"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clients = [subprocess.Popen(slm + ["client", "--data", silos[i], "--server", f"127.0.0.1:{port}"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        out, _ = server.communicate(timeout=300)
        assert server.returncode == 0, out
        for c in clients:
            text, _ = c.communicate(timeout=60)
            assert c.returncode == 0 and "the run is over" in text, text
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
    s = json.loads((tmp_path / "m" / "federation.json").read_text())
    assert s["mode"] == "server" and [r["clients_trained"] for r in s["history"]] == [2, 2]
    assert (tmp_path / "m" / "model.safetensors").is_file() and "round 2/2" in out
    assert json.loads((tmp_path / "m" / "clients-tokenizer" / "statistics.json").read_text())["clients"] == 2
    assert json.loads((tmp_path / "m" / "config.json").read_text())["vocab_size"] == 300


def _tls_files(d):
    """A CA and a certificate for 127.0.0.1 signed by it (PEM files), as an operator would make with openssl."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, key, issuer, issuer_key, ca, san=None):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("test CA", ca_key, "test CA", ca_key, True)
    server = cert("127.0.0.1", key, "test CA", ca_key, False,
                  [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    files = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return files


def test_a_tls_deployment_that_a_late_client_joins(tmp_path, silos):
    """Server and clients over TLS (certificates from a private CA); a third client connects after round 1 and
    trains from the next round on."""
    import os
    import subprocess
    import sys
    import threading

    from tiny_server import free_port

    tls = _tls_files(tmp_path)
    port = free_port()
    slm = [sys.executable, "-m", "slmkit", "federate"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(slm + ["server", "--out", str(tmp_path / "m"), "--min-clients", "2", "--rounds", "3",
                                     "--local-steps", "2", "--preset", "slm-tiny", "--block-size", "32",
                                     "--batch-size", "4", "--dtype", "fp32", "--port", str(port),
                                     "--ssl-cert", str(tls["cert"]), "--ssl-key", str(tls["key"]),
                                     "--ssl-ca", str(tls["ca"])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    round_1 = threading.Event()

    def read():
        for line in server.stdout:
            lines.append(line)
            if line.startswith("round 1/3"):
                round_1.set()
        round_1.set()  # (the server ended: the assertion below shows its output)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def client(i):
        return subprocess.Popen(slm + ["client", "--data", silos[i], "--server", f"127.0.0.1:{port}",
                                       "--root-certificates", str(tls["ca"])],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    clients = [client(0), client(1)]
    try:
        assert round_1.wait(300), "".join(lines)
        clients.append(client(2))  # the late one
        server.wait(300)
        reader.join(10)
        assert server.returncode == 0, "".join(lines)
        for c in clients:
            text, _ = c.communicate(timeout=60)
            assert c.returncode == 0 and "the run is over" in text, text
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
    trained = [r["clients_trained"] for r in json.loads((tmp_path / "m" / "federation.json").read_text())["history"]]
    assert trained[0] == 2 and trained[-1] == 3, trained  # it took part once connected


def test_lora_fine_tuning_sends_only_the_adapters(tmp_path, silos):
    pytest.importorskip("peft")
    from tiny_models import tiny_llama_folder

    base = tiny_llama_folder(tmp_path / "base")
    audit: list = []
    s = simulate(FederateConfig(data=silos[:2], out=tmp_path / "m", base=base, lora=True, rounds=2, local_steps=2,
                                batch_size=2, block_size=32, device="cpu", dtype="fp32"), audit)
    assert len(s["history"]) == 2
    train = [r for r in audit if r.content.array_records]
    keys = set(next(iter(train[0].content.array_records.values())).keys())
    assert keys and all("lora_" in k for k in keys)  # the frozen base never travels
    assert (tmp_path / "m" / "adapter_model.safetensors").is_file()
    from slmkit.training.merge import main as merge

    merge(tmp_path / "m", tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("flags", [
    dict(lora_r=4), dict(lora_alpha=8.0), dict(proximal_mu=0.1), dict(strategy="fedadam", proximal_mu=0.1),
    dict(server_lr=0.1), dict(strategy="fedprox", server_momentum=0.5), dict(dp_clip=0.5), dict(dp_delta=1e-6),
    dict(dp_noise=2.0), dict(dp_epsilon=8.0, dp_noise=2.0), dict(local_steps=3, tokens=100_000),
    dict(base="B", preset="slm-tiny"), dict(base="B", tokenizer_from="T"), dict(timeout=30.0),
    dict(secagg_shares=0.5), dict(secagg_threshold=0.5), dict(vocab_size=512), dict(vocab_min_count=2),
    dict(vocab_words=100)])
def test_a_flag_this_run_would_not_read_is_refused_before_any_work(tmp_path, flags):
    """Each was accepted and dropped: LoRA sizes without --lora, another strategy's settings, DP settings without
    --dp, --dp-noise under --dp-epsilon, --tokens under --local-steps, --preset/--tokenizer-from under --base,
    --timeout in a simulation (its clients always reply)."""
    from slmkit.federate.run import check

    data = [str(tmp_path / f"{i}.txt") for i in range(2)]
    for d in data:
        open(d, "w").write("some text\n")
    flag = list(flags)[-1].replace("_", "-")
    with pytest.raises(SystemExit, match=f"^error: --{flag} does not apply to "):
        check(FederateConfig(data=data, out=tmp_path / "m", **flags))
    assert not (tmp_path / "m").exists()
    check(FederateConfig(data=data, out=tmp_path / "m", strategy="fedavgm", server_lr=0.5, server_momentum=0.8))
    for bad in (dict(dp=True), dict(strategy="fedprox"), dict(secagg_shares=1.5)):  # SecAgg+ is FedAvg's, without DP
        with pytest.raises(SystemExit, match="^error: --secagg"):
            check(FederateConfig(data=data, out=tmp_path / "m", secagg=True, **bad))


def test_text_col_and_replace_errors_reach_every_client(tmp_path, silos, capsys):
    """The clients' read errors advised --text-col and --replace-errors, which `slm federate` did not have."""
    import argparse

    from slmkit.federate.cli import add_args

    p = argparse.ArgumentParser()
    add_args(p)
    o = p.parse_args(["simulate", "--data", "a", "b", "--out", "m", "--text-col", "body", "--replace-errors"])
    assert o.text_col == "body" and o.replace_errors is True
    data = []
    for i, silo in enumerate(silos[:2]):
        text = open(silo).read()[:6000]
        path = tmp_path / f"s{i}.jsonl"
        path.write_text("".join(json.dumps({"body": text[j:j + 500]}) + "\n" for j in range(0, len(text), 500)))
        data.append(str(path))

    def trained(name: str, **kw) -> int:
        return run(tmp_path, silos, name=name, rounds=1, **kw)["history"][0]["clients_trained"]

    with pytest.raises(SystemExit, match="every client failed its train round; the first said: .*no 'text' field"):
        trained("a", data=data)  # no "text" field: every client fails, and the run says why
    assert trained("b", data=data, text_col="body") == 2
    bad = tmp_path / "bad.txt"
    bad.write_bytes(open(silos[2], "rb").read()[:6000] + b"\xff\xfe")
    capsys.readouterr()
    assert trained("c", data=[silos[0], str(bad)]) == 1  # not UTF-8: that client fails, and it is said
    assert "failed its train round: " in capsys.readouterr().err
    assert trained("d", data=[silos[0], str(bad)], replace_errors=True) == 2


def test_a_killed_client_takes_its_supernode_with_it(tmp_path, silos):
    """`slm federate client` killed by SIGKILL (no `finally` runs): its flower-supernode child must not live on,
    polling, able to join a later run with this machine's data."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tiny_server import free_port

    client = subprocess.Popen([sys.executable, "-m", "slmkit", "federate", "client", "--data", silos[0], "--server",
                               f"127.0.0.1:{free_port()}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    children: list[int] = []
    t0 = time.time()
    while not children and time.time() - t0 < 60:  # the SuperNode starts (and keeps retrying: no server there)
        time.sleep(0.2)
        path = f"/proc/{client.pid}/task/{client.pid}/children"
        children = [int(c) for c in open(path).read().split()] if os.path.exists(path) else []
    assert children, "the client started no SuperNode"
    client.send_signal(signal.SIGKILL)
    client.wait(10)

    def running(pid: int) -> bool:  # exists and is not a zombie (state Z)
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    t0 = time.time()
    while time.time() - t0 < 20 and any(map(running, children)):
        time.sleep(0.2)
    alive = [c for c in children if running(c)]
    for c in alive:
        os.kill(c, signal.SIGKILL)
    assert not alive
