"""The OpenAI-compatible client (slmkit.compose.remote): against `slm serve` on tiny models, and against a scripted
stdlib server for the retry, timeout and error paths."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tiny_server import model_folders, running, serve_folders

from slmkit.compose.remote import RemoteError, RemoteModel, api_base, is_url


def test_urls():
    assert is_url("http://h:8000") and is_url("HTTPS://h/v1") and not is_url("models/small") and not is_url("")
    assert api_base("http://h:8000") == api_base("http://h:8000/") == api_base("http://h:8000/v1/") == "http://h:8000/v1"
    with pytest.raises(ValueError, match="not an http"):
        RemoteModel("models/large")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folders = model_folders(tmp_path_factory.mktemp("remote"))
    with running(serve_folders({"tiny": folders["tiny"], "clf": folders["clf"]}, api_keys=["sesame"])) as url:
        yield url, folders


def test_against_slm_serve(server, monkeypatch):
    from slmkit.infer.classify import predict

    url, folders = server
    monkeypatch.setenv("TEST_SLM_KEY", "sesame")
    remote = RemoteModel(url, api_key_env="TEST_SLM_KEY")  # no /v1: added
    assert remote.models() == ["tiny", "clf"]
    out = remote.complete("the cat", max_new_tokens=3, temperature=0)  # our name for max_tokens
    assert out["model"] == "tiny" and out["usage"]["completion_tokens"] <= 3 and out["finish_reason"] in ("stop",
                                                                                                          "length")
    assert isinstance(out["text"], str)
    reply = RemoteModel(url + "/v1", "tiny", "TEST_SLM_KEY").chat([{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply["usage"]["completion_tokens"] <= 2 and set(reply) == {"text", "model", "finish_reason", "usage"}
    texts = ["a good day", "an awful movie"]
    rows = RemoteModel(url, "clf", "TEST_SLM_KEY").classify(texts, top_k=2)
    local = predict(folders["clf"], texts, top_k=2)
    assert [[(x["label"], pytest.approx(x["score"], abs=1e-5)) for x in r] for r in rows] == local


def test_keys_come_from_the_environment_and_client_errors_are_not_retried(server, monkeypatch):
    url, _ = server
    monkeypatch.delenv("TEST_SLM_KEY", raising=False)
    with pytest.raises(RemoteError, match="environment variable TEST_SLM_KEY .* is not set"):
        RemoteModel(url, "tiny", "TEST_SLM_KEY")
    monkeypatch.setenv("TEST_SLM_KEY", "wrong")
    remote = RemoteModel(url, "tiny", "TEST_SLM_KEY", backoff=5.0)
    t0 = time.perf_counter()
    with pytest.raises(RemoteError, match=r"/v1/completions answered 401: missing or wrong API key"):
        remote.complete("hi", max_tokens=2)
    assert time.perf_counter() - t0 < 2  # a 401 is not worth a retry (a retry would have slept 5 s)


@pytest.fixture
def scripted():
    """A server answering each POST with the next (status, delay) of its script; the last one repeats."""
    hits, script = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the stdlib's name)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            hits.append(self.path)
            status, delay = script[min(len(hits), len(script)) - 1]
            time.sleep(delay)
            body = json.dumps({"model": "m", "choices": [{"text": "ok", "finish_reason": "stop"}]} if status == 200
                              else {"error": {"message": "overloaded, try later"}}).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up (timeout test)
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", hits, script
    httpd.shutdown()


def test_busy_and_failing_servers_are_retried_with_backoff(scripted):
    url, hits, script = scripted
    script += [(503, 0), (429, 0), (200, 0)]
    out = RemoteModel(url, "m", retries=3, backoff=0.01).complete("hi")
    assert out["text"] == "ok" and len(hits) == 3 and hits[0] == "/v1/completions"
    hits.clear()
    script[:] = [(503, 0)]
    with pytest.raises(RemoteError, match=r"/v1/completions answered 503 \(overloaded, try later\) after 2 tries; "
                                          "is the server running"):
        RemoteModel(url, "m", retries=2, backoff=0.01).complete("hi")
    assert len(hits) == 2


def test_slow_and_unreachable_servers_fail_in_one_line(scripted):
    url, hits, script = scripted
    script += [(200, 1.0)]
    with pytest.raises(RemoteError, match="gave no answer within 0.2 s after 1 try;") as e:
        RemoteModel(url, "m", timeout=0.2, retries=1).complete("hi")
    assert "\n" not in str(e.value)
    with pytest.raises(RemoteError, match=r"^http://127\.0\.0\.1:9/v1/chat/completions cannot be reached .* after 2 "
                                          r"tries; is the server running\? check the URL"):
        RemoteModel("http://127.0.0.1:9", "m", retries=2, backoff=0.01).chat([{"role": "user", "content": "hi"}])
