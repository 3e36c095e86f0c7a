"""The router: `slm route train` on tiny data, its rules and fallback, `slm eval` on a router folder, and `slm serve
--router` (model `auto` through the openai client, remote routes that do not answer)."""

import json
import random

import pytest
from tiny_encoders import tiny_mlm_folder, wordpiece, write_jsonl

from slmkit.compose.router import is_router, load_router, parse_rule

WORDS = {"poem": ["thou", "thee", "doth", "love", "heart", "sweet", "night", "moon"],
         "code": ["def", "return", "import", "class", "list", "print", "self", "loop"],
         "news": ["congress", "nation", "economy", "tax", "jobs", "america", "budget", "law"]}
FILLER = ["the", "a", "of", "and", "to", "in", "is", "it", "that", "this"]


def route_rows(n: int, seed: int = 0) -> list[dict]:
    """{"text", "label"} rows: up to two filler words and two to four words of the route's own vocabulary."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(WORDS)[i % 3]
        words = rng.choices(FILLER, k=rng.randint(0, 2)) + rng.choices(WORDS[label], k=rng.randint(2, 4))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("route")
    rows = route_rows(210, seed=1)
    tok = wordpiece(extra=[r["text"] for r in rows])
    return {"dir": d, "encoder": tiny_mlm_folder(d / "enc", tok), "train": write_jsonl(d / "train.jsonl", rows[:150]),
            "test": write_jsonl(d / "test.jsonl", rows[150:])}


@pytest.fixture(scope="module")
def router_dir(toy):
    from slmkit.compose.route_cli import train

    out = toy["dir"] / "router"
    summary = train([toy["train"]], out, encoder=toy["encoder"], rule=[r"code=\bdef\s+\w+\("], fallback="general",
                    min_confidence=0.4, epochs=15, lr=2e-3, progress=False)
    return out, summary


def test_router_folder_is_a_classifier_with_its_routes(router_dir):
    from slmkit.infer.classify import predict

    out, summary = router_dir
    spec = json.loads((out / "router.json").read_text())
    assert is_router(out) and not is_router(out.parent)
    assert spec["labels"] == ["code", "news", "poem"] and spec["routes"] == ["code", "news", "poem", "general"]
    assert spec["fallback"] == "general" and spec["min_confidence"] == 0.4
    assert [row["min_confidence"] for row in spec["calibration"]] == [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    assert summary["routing"]["accuracy"] >= 0.9  # the held-out split, routed with rules and fallback
    assert predict(out, ["thou doth love the moon"])[0][0][0] == "poem"  # slm classify reads the folder as it is


def test_route_applies_rules_then_classifier_then_fallback(router_dir):
    router = load_router(router_dir[0])
    texts = ["please DEF parse(x): thou love", "the nation and the economy budget", "thou sweet heart of the moon"]
    picks = router.route(texts)
    assert picks[0] == ("code", 1.0, "rule")  # the rule wins over the poem words; case-insensitive
    assert [p[0] for p in picks[1:]] == ["news", "poem"] and all(p[2] == "router" for p in picks[1:])
    router.min_confidence = 0.999  # nothing is that sure: everything not ruled goes to the fallback
    picks = router.route(texts)
    assert picks[0][0] == "code" and [(p[0], p[2]) for p in picks[1:]] == [("general", "fallback")] * 2
    assert all(p[1] < 0.999 for p in picks[1:])  # the fallback carries the classifier's own confidence


def test_eval_reports_routing_accuracy_and_confusion(router_dir, toy, capsys):
    from slmkit.infer.evaluate import main as evaluate

    result = evaluate(router_dir[0], [str(toy["test"])], as_json=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed["labels"] == ["code", "news", "poem", "general"]
    cm = printed["confusion_matrix"]
    assert sum(map(sum, cm)) == 60 and [sum(r) for r in cm] == [20, 20, 20, 0]
    assert printed["accuracy"] == pytest.approx(sum(cm[i][i] for i in range(4)) / 60) and printed["accuracy"] >= 0.9
    assert result["decided_by"]["rule"] == 0 and sum(result["decided_by"].values()) == 60


def test_bad_input_is_one_clear_line(router_dir, toy, tmp_path):
    from slmkit.compose.route_cli import train
    from slmkit.infer.evaluate import main as evaluate

    with pytest.raises(SystemExit, match="--encoder DIR is required"):
        train([toy["train"]], tmp_path / "r")
    with pytest.raises(SystemExit, match="ROUTE=REGEX"):
        parse_rule("no-equals-sign")
    with pytest.raises(SystemExit, match="not a regular expression"):
        parse_rule("code=(unclosed")
    with pytest.raises(SystemExit, match="needs --fallback"):
        train([toy["train"]], tmp_path / "r", encoder=toy["encoder"], min_confidence=0.5)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "hello", "label": "sports"}])
    with pytest.raises(SystemExit, match="'sports' is not one of the router's routes"):
        evaluate(router_dir[0], [str(bad)])
    with pytest.raises(SystemExit, match="already|overwrite"):  # nothing is replaced without --overwrite
        train([toy["train"]], router_dir[0], encoder=toy["encoder"], epochs=1)
    assert is_router(router_dir[0])


def test_cli_train_and_pick(toy, tmp_path, capsys):
    from slmkit.__main__ import main

    out = tmp_path / "cli-router"
    assert main(["route", "train", "--data", str(toy["train"]), "--encoder", str(toy["encoder"]), "--out", str(out),
                 "--steps", "2", "--rule", "poem=\\bthou\\b", "--no-progress"]) == 0
    assert "routing accuracy" in capsys.readouterr().out
    assert main(["route", "pick", str(out), "--text", "Thou", "--text", "the tax law of the nation", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (rows[0]["route"], rows[0]["confidence"], rows[0]["reason"]) == ("poem", 1.0, "rule")
    assert rows[1]["reason"] == "router" and rows[1]["route"] in ("code", "news", "poem")  # two steps: any route
    assert main(["route", "pick", str(out)]) == 1  # neither --text nor --data: one line, exit 1
    assert "give --text TEXT or --data FILE" in capsys.readouterr().err


# -- slm serve --router: the model `auto`, remote routes ---------------------------------------------------------
DEAD_URL = "http://127.0.0.1:9/v1"  # the discard port: nothing listens, the connection is refused at once


@pytest.fixture(scope="module")
def tiny(toy):
    from tiny_models import tiny_llama_folder

    return tiny_llama_folder(toy["dir"] / "tiny")


@pytest.fixture(scope="module")
def routed_server(router_dir, tiny):
    """`slm serve code=DIR news=DIR poem=DIR general=URL --router ROUTER` over tiny decoders, general unreachable."""
    from tiny_server import running

    from slmkit.compose.router_serve import remote_served, router_served
    from slmkit.serve import load_served
    from slmkit.serve.app import create_app

    served = {name: load_served(name, tiny) for name in ("code", "news", "poem")}
    served["general"] = remote_served("general", DEAD_URL)
    served["auto"] = router_served(router_dir[0], served)
    with running(create_app(served)) as url:
        yield url, served


def test_auto_answers_as_the_chosen_route_through_the_openai_client(routed_server):
    openai = pytest.importorskip("openai")
    url, _ = routed_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    listed = {m.id: m.kind for m in client.models.list().data}
    assert listed == {"code": "decoder", "news": "decoder", "poem": "decoder", "general": "remote", "auto": "router"}
    r = client.completions.create(model="auto", prompt="thou sweet heart of the moon", max_tokens=4, temperature=0)
    assert r.model == "poem" and r.choices[0].text == client.completions.create(
        model="poem", prompt="thou sweet heart of the moon", max_tokens=4, temperature=0).choices[0].text
    chat = client.chat.completions.create(model="auto", max_tokens=4, messages=[
        {"role": "user", "content": "thou sweet moon"}, {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "the nation and the economy budget"}])
    assert chat.model == "news"  # routed on the last user message
    raw = client.chat.completions.with_raw_response.create(model="auto", max_tokens=2, messages=[
        {"role": "user", "content": "def main(): return"}])
    assert raw.headers["x-slm-model"] == "code" and raw.headers["x-slm-route-reason"] == "rule"


def test_streaming_to_auto_streams_from_the_route(routed_server):
    openai = pytest.importorskip("openai")
    url, _ = routed_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(model="auto", max_tokens=6, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "thou doth love the night"}]))
    assert chunks and {c.model for c in chunks} == {"poem"} and chunks[-1].choices[0].finish_reason is not None


def test_an_unreachable_route_fails_its_requests_only(routed_server):
    import httpx

    url, served = routed_server
    router = served["auto"].model
    r = httpx.post(url + "/v1/completions", json={"model": "general", "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 502 and DEAD_URL in r.json()["error"]["message"]
    old = router.min_confidence
    router.min_confidence = 0.999  # every text the rule does not catch now goes to the (dead) fallback
    try:
        body = {"model": "auto", "messages": [{"role": "user", "content": "the tax law"}], "max_tokens": 2}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 502 and r.json()["error"]["code"] == "remote_model_unavailable"
        assert "'general'" in r.json()["error"]["message"] and DEAD_URL in r.json()["error"]["message"]
        ok = httpx.post(url + "/v1/chat/completions", timeout=30, json={**body, "messages": [
            {"role": "user", "content": "DEF f(): pass"}]})  # the rule's route keeps answering
        assert ok.status_code == 200 and ok.json()["model"] == "code"
    finally:
        router.min_confidence = old
    metrics = httpx.get(url + "/metrics", timeout=10).text
    assert 'slm_routed_requests_total{model="auto",route="general",reason="fallback"} 1' in metrics
    assert 'slm_routed_requests_total{model="auto",route="code",reason="rule"}' in metrics


def test_a_remote_route_that_answers(tiny, monkeypatch):
    """A route behind a URL (another slm serve, with an API key) answers as itself: model = the route's name here."""
    import httpx
    from tiny_server import running, serve_folders

    from slmkit.compose.router_serve import remote_served
    from slmkit.serve.app import create_app

    with pytest.raises(SystemExit, match="SLM_UNSET_KEY"):  # a key variable that is not set: one line at start-up
        remote_served("far", "http://127.0.0.1:9", "SLM_UNSET_KEY")
    monkeypatch.setenv("SLM_FAR_KEY", "sekrit")
    with running(serve_folders({"tiny": tiny}, api_keys=["sekrit"])) as far:
        app = create_app({"far": remote_served("far", far, "SLM_FAR_KEY")})
        with running(app) as url:
            body = {"model": "far", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                    "temperature": 0}
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
            direct = httpx.post(far + "/v1/chat/completions", json={**body, "model": "tiny"}, timeout=30,
                                headers={"Authorization": "Bearer sekrit"}).json()
            assert r.status_code == 200 and r.json()["model"] == "far"
            assert r.json()["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
            with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as s:
                lines = [x for x in s.iter_lines() if x]
            assert lines[-1] == "data: [DONE]" and all('"model": "far"' in x for x in lines[:-1])


def test_serve_start_up_checks_the_route_names(router_dir, tiny, capsys):
    from slmkit.__main__ import main
    from slmkit.compose.router_serve import router_served, url_spec
    from slmkit.serve import load_served

    served = {"code": load_served("code", tiny)}
    with pytest.raises(SystemExit, match="routes news, poem, general are not served"):
        router_served(router_dir[0], served)
    assert main(["serve", f"code={tiny}", f"news={tiny}", f"poem={tiny}", "--router", str(router_dir[0])]) == 1
    err = capsys.readouterr().err  # one line naming the missing route, before anything binds a port
    assert err.startswith("error: --router") and "routes general are not served" in err and err.count("\n") == 1
    with pytest.raises(SystemExit, match="name a model behind a URL"):
        url_spec("http://127.0.0.1:8000/v1")
    assert url_spec("big=https://example.org/v1") == ("big", "https://example.org/v1") and url_spec("a=dir") is None


def test_pick_refuses_text_col_with_text(tmp_path):
    """--text-col names a --data file's column; with --text it was dropped without a word (checked before loading)."""
    from slmkit.compose.route_cli import pick

    with pytest.raises(SystemExit, match="^error: --text-col does not apply to --text"):
        pick(tmp_path / "no-router", text=["hello"], text_col="body")


def test_eval_on_a_router_refuses_flags_it_would_not_read(router_dir, toy):
    """A router scores every labelled row whole, 32 texts a pass: --max-tokens, --block-size and --batch-size were
    dropped."""
    from slmkit.infer.evaluate import main as evaluate

    for flag, value in (("max_tokens", 10), ("block_size", 16), ("batch_size", 4)):
        with pytest.raises(SystemExit, match=f"^error: --{flag.replace('_', '-')} does not apply to `slm eval` on a "
                                             "router folder"):
            evaluate(router_dir[0], [str(toy["test"])], **{flag: value})
    assert evaluate(router_dir[0], [str(toy["test"])], device="cpu")["examples"] == 60


def test_train_passes_dtype_to_the_classifier_run(toy, tmp_path, monkeypatch):
    """A diverged loss advises `--dtype fp32`, which `slm route train` did not have."""
    import slmkit.training.classify as classify
    from slmkit.__main__ import main

    seen = {}

    def stop(*args, **options):  # the options the classifier run would get; then no training
        seen.update(options)
        raise SystemExit("stop")

    monkeypatch.setattr(classify, "finetune", stop)
    assert main(["route", "train", "--data", str(toy["train"]), "--encoder", str(toy["encoder"]), "--out",
                 str(tmp_path / "r"), "--dtype", "fp32"]) == 1
    assert seen["dtype"] == "fp32"
