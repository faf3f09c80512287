"""Serving: the service logic, the HTTP contract in-process, then Ray Serve over real HTTP."""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import IDS, LABELS, SENTIMENTS, free_port  # the catalogue and classes of conftest.tiny_bundle
from distillery.serving import api, bundle
from distillery.serving.service import Service

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def service(tiny_bundle) -> Service:
    return Service.from_bundle(tiny_bundle)


# ------------------------------------------------------------------------------ the service
def test_recommend_excludes_history_lists_unknown_ids_and_explains(service):
    [out] = service.recommend([{"history": IDS[:3] + ["nope", "nope"], "k": 20, "exclude_history": True,
                                "explain": True}])
    got = [i["item_id"] for i in out["items"]]
    assert len(got) == len(IDS) - 3 and not set(got) & set(IDS[:3])  # k past the catalogue: every other item
    assert [i["score"] for i in out["items"]] == sorted((i["score"] for i in out["items"]), reverse=True)
    assert out["unknown_ids"] == ["nope"] and out["cold_start"] is False
    weights = {e["item_id"]: e["weight"] for e in out["explanation"]}
    assert set(weights) == set(IDS[:3]) and sum(weights.values()) == pytest.approx(1.0, abs=1e-4)

    [kept] = service.recommend([{"history": IDS[:3], "k": 3, "exclude_history": False, "explain": False}])
    assert len(kept["items"]) == 3 and kept["explanation"] is None


def test_empty_or_unknown_history_is_a_cold_start_with_the_most_clicked_items(service):
    for history in ([], ["unknown-1"]):
        [out] = service.recommend([{"history": history, "k": 3, "exclude_history": True, "explain": False}])
        assert out["cold_start"] is True
        assert [i["item_id"] for i in out["items"]] == ["sku-1", "sku-6", "sku-3"]  # clicks 50, 40, 30
        assert [i["score"] for i in out["items"]] == [50.0, 40.0, 30.0]


def test_a_batch_answers_exactly_as_one_request_at_a_time(service):
    recs = [{"history": IDS[:4], "k": 5, "exclude_history": True, "explain": True},
            {"history": [IDS[7]], "k": 2, "exclude_history": False, "explain": False},
            {"history": [], "k": 2, "exclude_history": True, "explain": False}]
    ctrs = [{"history": IDS[2:9], "candidates": IDS[:5] + ["x"], "slots": None, "explain": True},
            {"history": [], "candidates": IDS[5:], "slots": [0, 1, 2, 3, 400], "explain": False}]
    intents = [{"texts": ["red pen", "", "coffee grinder burr"], "explain": True}, {"texts": ["tent"], "explain": False}]
    classify = functools.partial(service.classify, "intent")
    for method, requests in ((service.recommend, recs), (service.ctr, ctrs), (classify, intents)):
        together = method(requests)
        for request, answer in zip(requests, together):
            assert method([request]) == [answer] or _close(method([request])[0], answer)


def _close(a, b, tol=1e-5):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= tol
    return a == b


def test_ctr_scores_known_candidates_in_request_order(service):
    [out] = service.ctr([{"history": IDS[:2], "candidates": ["x", IDS[4], IDS[4], IDS[1], "y", "x"],
                          "slots": None, "explain": False}])
    assert [p["item_id"] for p in out["predictions"]] == [IDS[4], IDS[4], IDS[1]]
    assert out["unknown_ids"] == ["x", "y"]
    assert all(0 < p["probability"] < 1 for p in out["predictions"])
    assert out["predictions"][0]["probability"] == out["predictions"][1]["probability"]
    [slotted] = service.ctr([{"history": IDS[:2], "candidates": [IDS[4]] * 2, "slots": [0, 5], "explain": False}])
    assert slotted["predictions"][0]["probability"] != slotted["predictions"][1]["probability"]  # slot matters


def test_intent_returns_the_top_three_and_word_explanations(service):
    [out] = service.classify("intent", [{"texts": ["red gel pen for the office", "x" * 1000], "explain": True}])
    for pred in out["predictions"]:
        assert len(pred["top"]) == 3 and pred["top"][0]["label"] == pred["label"] in LABELS
        probs = [t["probability"] for t in pred["top"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    words = [e["token"] for e in out["predictions"][0]["explanation"]]
    assert len(words) == 5 and set(words) <= set("red gel pen for the office".split())


def test_each_text_task_answers_with_its_own_classes(service):
    [intent] = service.classify("intent", [{"texts": ["bad pen, broke fast"], "explain": False}])
    [sentiment] = service.classify("sentiment", [{"texts": ["bad pen, broke fast"], "explain": True}])
    assert intent["predictions"][0]["label"] in LABELS and sentiment["predictions"][0]["label"] in SENTIMENTS
    assert {t["label"] for t in sentiment["predictions"][0]["top"]} == set(SENTIMENTS)  # its 3 classes, not intent's
    assert sentiment["predictions"][0]["explanation"]


def test_items_page_through_the_catalogue_and_the_card_names_the_bundle(service, tiny_bundle):
    page = service.items(limit=4, offset=8)
    assert page["total"] == 10 and [i["item_id"] for i in page["items"]] == IDS[8:]
    card = service.card
    manifest = json.load(open(Path(tiny_bundle) / "manifest.json"))
    assert card["catalogue_size"] == 10 and card["created"] == manifest["created"]
    assert card["bundle"]["model.safetensors"]["sha256"] == manifest["files"]["model.safetensors"]["sha256"]
    assert card["metrics"] == {"test": {"intent": {"macro_f1": 0.5}}} and len(card["version"]) == 16


def test_an_altered_bundle_is_refused_before_serving(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    (copy / "items.parquet").write_bytes(b"not parquet")
    with pytest.raises(bundle.BundleError, match="items.parquet: altered"):
        Service.from_bundle(str(copy))


# ------------------------------------------------------------------------------ the HTTP contract, in-process
@pytest.fixture(scope="module")
def client(service):
    from fastapi.testclient import TestClient

    return TestClient(api.create_app(api.LocalBackend(service), max_body_bytes=4096, api_key=""))


BAD = [  # (path, body, status, text the message must contain)
    ("/v1/recommend", {"history": "nope", "k": 10}, 422, "history"),
    ("/v1/recommend", {"k": -1}, 422, "history: Field required"),
    ("/v1/recommend", {"history": [], "k": -1}, 422, "k: Input should be greater than or equal to 1"),
    ("/v1/recommend", {"history": [], "k": 1001}, 422, "k:"),
    ("/v1/recommend", {}, 422, "history: Field required"),
    ("/v1/recommend", {"history": [], "histroy": []}, 422, "histroy: Extra inputs are not permitted"),
    ("/v1/recommend", {"history": [1, 2]}, 422, "history.0: Input should be a valid string"),
    ("/v1/recommend", {"history": [""]}, 422, "history.0"),
    ("/v1/recommend", [1, 2], 422, "body"),
    ("/v1/ctr", {"history": [], "candidates": []}, 422, "candidates: List should have at least 1 item"),
    ("/v1/ctr", {"history": [], "candidates": ["a"] * 1001}, 422, "candidates"),
    ("/v1/ctr", {"history": [], "candidates": ["a", "b"], "slots": [1]}, 422, "slots: Value error, slots has 1 entries"),
    ("/v1/ctr", {"history": [], "candidates": ["a"], "slots": [-3]}, 422, "slots.0"),
    ("/v1/intent", {"texts": 5}, 422, "texts: Input should be a valid list"),
    ("/v1/intent", {"texts": []}, 422, "texts: List should have at least 1 item"),
    ("/v1/intent", {"texts": ["a"] * 257}, 422, "texts"),
    ("/v1/intent", {"texts": [None]}, 422, "texts.0"),
    ("/v1/intent", {"texts": ["x" * 1001]}, 422, "texts.0: String should have at most 1000 characters"),
]


@pytest.mark.parametrize("path,body,status,message", BAD)
def test_bad_requests_get_a_4xx_naming_the_field(client, path, body, status, message):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_malformed_json_oversized_bodies_and_bad_queries_are_4xx(client):
    r = client.post("/v1/recommend", content=b'{"history": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    r = client.post("/v1/intent", json={"texts": ["y" * 900] * 5})  # 4.5 kB > this app's 4 kB
    assert r.status_code == 413 and "4096-byte limit" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"texts": ["'
        for _ in range(10):
            yield b"z" * 1000
        yield b'"]}'
    r = client.post("/v1/intent", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert client.get("/v1/items?limit=0").status_code == 422
    assert client.get("/v1/items?offset=-1").status_code == 422
    assert client.get("/v1/items?limit=abc").status_code == 422
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/recommend").status_code == 405


def test_text_that_is_not_unicode_is_a_4xx_naming_the_field(client):
    json_type = {"Content-Type": "application/json"}
    r = client.post("/v1/intent", content=b'{"texts": ["caf\\ud800 latte"]}', headers=json_type)  # lone surrogate
    assert r.status_code == 422 and "texts.0" in r.json()["detail"]
    r = client.post("/v1/recommend", content=b'{"history": ["\\udfff"]}', headers=json_type)
    assert r.status_code == 422 and "history.0" in r.json()["detail"]
    r = client.post("/v1/intent", content=b'{"texts": ["caf\xff"]}', headers=json_type)  # not UTF-8
    assert r.status_code == 400


def test_the_api_key_is_required_on_v1_when_set(service):
    from fastapi.testclient import TestClient

    secured = TestClient(api.create_app(api.LocalBackend(service), api_key="s3cret"))
    assert secured.get("/healthz").status_code == 200  # health stays open for load balancers
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = secured.get("/v1/items", headers=headers)
        assert r.status_code == 401 and "DISTILLERY_API_KEY" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
    assert secured.get("/v1/items", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert secured.post("/v1/intent", json={"texts": ["a"]}, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_text_task_the_bundle_was_not_trained_for_is_a_404_naming_what_it_serves(service):
    from fastapi.testclient import TestClient

    class NoSentiment(api.LocalBackend):
        async def card(self) -> dict:
            return {**self.service.card, "tasks": ["recommendation", "ctr", "intent"]}

    client = TestClient(api.create_app(NoSentiment(service), api_key=""))
    r = client.post("/v1/sentiment", json={"texts": ["great"]})
    assert r.status_code == 404 and r.json()["detail"] == ("this model was not trained for sentiment: it serves "
                                                           "recommendation, ctr, intent")
    assert client.post("/v1/intent", json={"texts": ["great"]}).status_code == 200
    assert TestClient(api.create_app(api.LocalBackend(service), api_key="")).post(
        "/v1/sentiment", json={"texts": ["great"], "explain": True}).json()["predictions"][0]["label"] in SENTIMENTS


# ------------------------------------------------------------------------------ Ray Serve over real HTTP
@pytest.fixture(scope="module")
def serve_apps(ray_local, tiny_bundle):
    """Both topologies on the session's Ray, on a free loopback port: {"one": base URL (the default,
    one deployment), "split": base URL (ingress and model apart)}."""
    from distillery.serving.app import APP_NAME, AppArgs, build_app, wait_ready
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    common = {"bundle": tiny_bundle, "model_cpus": 0.3, "ingress_cpus": 0.1, "max_body_bytes": 8192}
    serve.run(build_app(AppArgs(**common)), name=APP_NAME, route_prefix="/", blocking=False)
    serve.run(build_app(AppArgs(**common, split=True)), name="split", route_prefix="/split", blocking=False)
    bases = {"one": base, "split": f"{base}/split"}
    for b in bases.values():
        wait_ready(b, timeout_s=180)
    yield bases
    serve.shutdown()


@pytest.fixture
def served(serve_apps):
    return serve_apps["one"]


@pytest.mark.integration
@pytest.mark.parametrize("topology", ["one", "split"])
def test_every_endpoint_answers_over_http(serve_apps, topology):
    import requests

    served = serve_apps[topology]
    assert requests.get(f"{served}/healthz").json()["status"] == "ok"
    items = requests.get(f"{served}/v1/items", params={"limit": 20}).json()
    assert items["total"] == 10 and len(items["items"]) == 10
    assert requests.get(f"{served}/v1/model").json()["catalogue_size"] == 10
    r = requests.post(f"{served}/v1/recommend", json={"history": IDS[:2] + ["zz"], "k": 3, "explain": True})
    assert r.status_code == 200 and len(r.json()["items"]) == 3 and r.json()["unknown_ids"] == ["zz"]
    r = requests.post(f"{served}/v1/ctr", json={"history": IDS[:2], "candidates": IDS[2:7]})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 5
    r = requests.post(f"{served}/v1/intent", json={"texts": ["red pen", "tent"], "explain": True})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2


@pytest.mark.integration
def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(served):
    from concurrent.futures import ThreadPoolExecutor

    import requests

    def ask(i):
        return requests.post(f"{served}/v1/ctr", json={"history": [IDS[i % 10]], "candidates": [IDS[(i + 1) % 10]]}).json()

    before = requests.get(f"{served}/v1/model").json()["batches"]["/v1/ctr"]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(48)))
    after = requests.get(f"{served}/v1/model").json()["batches"]["/v1/ctr"]
    # one replica answered all 48, in fewer model calls than requests: they were batched
    assert after["requests"] - before["requests"] == 48 and after["calls"] - before["calls"] < 48
    for i, a in enumerate(answers):
        assert [p["item_id"] for p in a["predictions"]] == [IDS[(i + 1) % 10]]
        alone = requests.post(f"{served}/v1/ctr", json={"history": [IDS[i % 10]], "candidates": [IDS[(i + 1) % 10]]})
        assert a["predictions"][0]["probability"] == pytest.approx(alone.json()["predictions"][0]["probability"], abs=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("path,body", [
    ("/v1/recommend", {"history": "nope", "k": 10}), ("/v1/recommend", {"k": -1}), ("/v1/recommend", {}),
    ("/v1/intent", {"texts": 5}), ("/v1/ctr", {"history": [], "candidates": ["a"], "slots": [1, 2]})])
def test_bad_inputs_over_http_are_4xx(served, path, body):
    import requests

    r = requests.post(served + path, json=body)
    assert r.status_code == 422 and r.json()["detail"]


@pytest.mark.integration
def test_malformed_and_oversized_bodies_over_http_are_4xx(served):
    import requests

    r = requests.post(f"{served}/v1/recommend", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    r = requests.post(f"{served}/v1/intent", json={"texts": ["q" * 1000] * 10})
    assert r.status_code == 413
    assert requests.get(f"{served}/v1/items", params={"limit": -5}).status_code == 422
    assert requests.get(f"{served}/healthz").status_code == 200  # still up


# ------------------------------------------------------------------------------ deployment config, CLI
def test_serve_config_validates_against_ray_serves_schema_and_the_app_args():
    from distillery.serving.app import AppArgs
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(open(ROOT / "serve" / "config.yaml"))
    schema = ServeDeploySchema(**raw)
    [app] = schema.applications
    assert app.import_path == "serve.app:app" and app.runtime_env["working_dir"].startswith("local://")
    assert AppArgs(**app.args).max_batch_size == 32
    assert schema.http_options.host == "0.0.0.0"  # HAProxy reaches other nodes' replicas (tests/test_security.py)
    model = next(d for d in app.deployments if d.name == "Endpoint")
    auto = model.autoscaling_config
    assert auto["min_replicas"] >= 1 and auto["max_replicas"] > auto["min_replicas"] and auto["target_ongoing_requests"]
    assert model.max_ongoing_requests >= app.args["max_batch_size"]
    assert open(ROOT / "serve" / "config.yaml").readline().startswith("# serve deploy serve/config.yaml")


def test_the_app_builder_takes_typed_args(tiny_bundle):
    sys.path.insert(0, str(ROOT))
    try:
        from serve.app import app
    finally:
        sys.path.remove(str(ROOT))
    built = app({"bundle": tiny_bundle, "max_batch_size": 8})
    assert type(built).__name__ == "Application"
    with pytest.raises(Exception, match="max_batch_size"):
        app({"bundle": tiny_bundle, "max_batch_size": 0})


def test_the_default_ingress_is_direct_for_one_replica_and_haproxy_for_more(monkeypatch):
    from distillery.config import ServeConfig
    from distillery.errors import ConfigError
    from distillery.serving import app as serving

    one = serving.ingress(ServeConfig(port=8123), lambda: 40001)
    # the replica takes the served port itself; Serve's own proxy gets a spare one
    assert one.mode == "direct" and one.proxy_port == 40001
    assert one.env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1" and one.env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8123"
    monkeypatch.setattr(serving, "haproxy_binary", lambda: "/usr/sbin/haproxy")
    many = serving.ingress(ServeConfig(port=8123, replicas=3), lambda: 40001)
    assert (many.mode, many.env, many.proxy_port, many.note) == ("haproxy", serving.HAPROXY_ENV, 8123, None)
    monkeypatch.setattr(serving, "haproxy_binary", lambda: None)
    fallback = serving.ingress(ServeConfig(port=8123, replicas=3), lambda: 40001)
    assert (fallback.mode, fallback.env, fallback.proxy_port) == ("proxy", {}, 8123) and "haproxy" in fallback.note
    assert serving.ingress(ServeConfig(port=8123, ingress="proxy"), lambda: 40001).env == {}
    with pytest.raises(ConfigError, match="ingress direct serves one replica.*--ingress"):
        serving.ingress(ServeConfig(ingress="direct", replicas=2), lambda: 40001)
    assert serving.logging_config(False) == {"enable_access_log": False, "log_level": "WARNING"}


def test_a_port_in_use_or_a_bad_host_is_a_named_error_before_ray_starts():
    import socket

    from distillery.errors import ConfigError
    from distillery.serving import app as serving

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot serve on 127.0.0.1:{port}"):
            serving._check_bindable("127.0.0.1", port)
    with pytest.raises(ConfigError, match="pass another --port / --host"):
        serving._check_bindable("no-such-host.invalid", 8000)


@pytest.mark.integration
def test_distillery_serve_answers_with_a_key_and_stops_on_sigterm(tiny_bundle):
    import requests

    port = free_port()
    env = {**os.environ, api.API_KEY_ENV: "k3y", "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "distillery.cli", "serve", tiny_bundle, "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the proxy is up before the app
                pass
            assert time.monotonic() < deadline, "distillery serve did not come up"
            time.sleep(1)
        assert requests.get(f"{base}/v1/items").status_code == 401
        r = requests.get(f"{base}/v1/items", params={"limit": 20}, headers={"Authorization": "Bearer k3y"})
        assert r.status_code == 200 and len(r.json()["items"]) == 10
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert "serving" in out and "(direct ingress)" in out and "stopping" in out
    finally:
        if proc.poll() is None:
            proc.kill()
