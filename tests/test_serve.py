"""The OpenAI-compatible server (`inference/serve.py`) with the official `openai` client, over
the default model pair on 127.0.0.1: outputs equal plain decoding of the same request alone,
streaming, stop strings, concurrency, bad input, disconnects, faults, the API key, metrics."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from convert.export_draft import export_draft
from griffin_jax import budget as budget_lib
from griffin_jax import draft as draft_lib
from griffin_jax import engine as engine_lib
from inference import serve
from inference.api import SpeculativeModel

MAX_LEN = 192
PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\ndef list_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "The capital of France is",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model():
    return SpeculativeModel.from_pretrained()


@pytest.fixture(scope="module")
def engine(model):
    eng = engine_lib.Engine(
        model.base_params, model.cfg, model.draft_params, model.dcfg, tree=model.tree_cfg,
        max_batch=2, max_model_len=MAX_LEN, max_queue=64, draft_head=model.draft_head(),
    )  # fmt: skip
    eng.start()
    yield eng
    eng.stop(drain=False, timeout=30)


@pytest.fixture(scope="module")
def server(engine, model):
    srv = serve.ThreadedServer(serve.create_app(engine, model.tokenizer))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def _alone(model, prompt: str | list[int], max_tokens: int, **sampling) -> str:
    """Plain decoding of the request alone (`vanilla_generate`), as text.

    Decoded to 48 new tokens and cut to `max_tokens` (one compiled program for every
    max_tokens: greedy and position-keyed sampling emit the same prefix whatever the limit)."""
    ids = model.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt
    assert max_tokens <= 48
    out = model.vanilla_generate([ids], max_new_tokens=48, **sampling).output_ids[0]
    return model.tokenizer.decode(out[:max_tokens], skip_special_tokens=True)


def _post(url: str, body: object, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                          **(headers or {})})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _metric(server, name: str) -> float:
    _, text = _get(server.url + "/metrics")
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_completion_equals_plain_decoding_streamed_or_not(client, model):
    want = _alone(model, PROMPTS[0], 40)
    got = client.completions.create(
        model="griffin-jax", prompt=PROMPTS[0], max_tokens=40, temperature=0
    )
    assert got.choices[0].text == want
    assert got.choices[0].finish_reason in ("stop", "length")
    assert got.usage.completion_tokens <= 40 and got.usage.prompt_tokens > 0
    stream = client.completions.create(
        model="griffin-jax", prompt=PROMPTS[0], max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1  # really streamed
    echoed = client.completions.create(
        model="griffin-jax", prompt=PROMPTS[0], max_tokens=40, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPTS[0] + want


def test_chat_completion_streamed_and_not(client, model):
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    got = client.chat.completions.create(
        model="griffin-jax", messages=messages, max_completion_tokens=24, temperature=0
    )
    text = got.choices[0].message.content
    assert got.choices[0].message.role == "assistant" and text
    ids = model.tokenizer.apply_chat_template(
        messages, chat_template=serve.PLAIN_CHAT_TEMPLATE, add_generation_prompt=True,
        tokenize=True,
    )  # fmt: skip
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert text == _alone(model, list(ids), 24)
    chunks = list(client.chat.completions.create(
        model="griffin-jax", messages=messages, max_tokens=24, temperature=0, stream=True
    ))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason


def test_stop_strings_cut_across_chunks(client, model):
    full = _alone(model, PROMPTS[0], 48)
    ids = model.tokenizer(PROMPTS[0])["input_ids"]
    out = model.vanilla_generate([ids], max_new_tokens=48).output_ids[0]
    # a stop string across the boundary of the tokens after the 12th new one
    edge = len(model.tokenizer.decode(out[:12], skip_special_tokens=True))
    stop = full[edge - 2 : edge + 3]
    assert len(stop) == 5 and full.index(stop) > 0
    want = full[: full.index(stop)]
    got = client.completions.create(
        model="griffin-jax", prompt=PROMPTS[0], max_tokens=48, temperature=0, stop=[stop]
    )
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(
        model="griffin-jax", prompt=PROMPTS[0], max_tokens=48, temperature=0, stop=stop,
        stream=True,
    ))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def _rounds_by_shape(server) -> dict[str, float]:
    _, text = _get(server.url + "/metrics")
    found = re.findall(r'^griffin_rounds_by_shape_total\{shape="([^"]+)"\} (\S+)$', text, re.M)
    return {shape: float(v) for shape, v in found}


def test_concurrent_requests_each_equal_the_request_alone(client, model, server, engine):
    rounds_before = _metric(server, "griffin_verification_rounds_total")
    shapes_before = _rounds_by_shape(server)
    accepted_before = _metric(server, "griffin_accepted_draft_tokens_total")
    jobs = []
    for i in range(8):
        prompt = PROMPTS[i % 4] * (1 + i % 2)  # different lengths
        sampling = {} if i % 3 else dict(temperature=0.9, top_p=0.95, seed=100 + i)
        jobs.append((i * 0.05, prompt, (12, 24)[(i // 4) % 2] + i % 4, sampling))

    def run(job):
        delay, prompt, max_tokens, sampling = job
        time.sleep(delay)
        out = client.completions.create(
            model="griffin-jax", prompt=prompt, max_tokens=max_tokens,
            temperature=sampling.get("temperature", 0), top_p=sampling.get("top_p", 1.0),
            seed=sampling.get("seed"),
        )  # fmt: skip
        return out.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(run, jobs))
    for (_, prompt, max_tokens, sampling), text in zip(jobs, got, strict=True):
        assert text == _alone(model, prompt, max_tokens, **sampling), (prompt, sampling)
    rounds = _metric(server, "griffin_verification_rounds_total") - rounds_before
    accepted = _metric(server, "griffin_accepted_draft_tokens_total") - accepted_before
    assert rounds > 0 and accepted > 0.3 * rounds  # multi-token commits happened
    # the engine's rounds by shape (one round serves every busy row: at most the rows' rounds)
    shapes = _rounds_by_shape(server)
    assert set(shapes) == {budget_lib.describe(s) for s in engine.shapes}
    ran = sum(shapes.values()) - sum(shapes_before.values())
    assert 0 < ran <= rounds


@pytest.mark.parametrize(
    "body,status,param",
    [
        (b"{not json", 400, None),
        ({"prompt": "hi"}, 400, "model"),
        ({"model": "other", "prompt": "hi"}, 404, "model"),
        ({"model": "griffin-jax", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "griffin-jax", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
        ({"model": "griffin-jax", "prompt": "hi", "max_tokens": MAX_LEN}, 400, "max_tokens"),
        ({"model": "griffin-jax", "prompt": [5, 10**6]}, 400, "prompt"),
        ({"model": "griffin-jax", "prompt": ""}, 400, "prompt"),
        ({"model": "griffin-jax", "prompt": "hi", "temperature": 3}, 400, "temperature"),
        ({"model": "griffin-jax", "prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"model": "griffin-jax", "prompt": "hi", "logprobs": 2}, 400, "logprobs"),
        ({"model": "griffin-jax", "prompt": "hi", "n": 2}, 400, "n"),
        ({"model": "griffin-jax", "prompt": "hi", "presence_penalty": 1}, 400, "presence_penalty"),
        ({"model": "griffin-jax", "prompt": "hi", "stop": [""]}, 400, "stop"),
        ({"model": "griffin-jax", "messages": [{"role": "user"}]}, 400, "messages"),
        ({"model": "griffin-jax", "messages": [{"role": "user", "content": "hi"}],
          "tools": [{"type": "function"}]}, 400, "tools"),
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_error_and_the_server_keeps_serving(server, body, status, param):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else (
        "/v1/completions"
    )  # fmt: skip
    code, answer = _post(server.url + path, body)
    assert code == status, answer
    err = answer["error"]
    assert err["message"] and err["type"] and err["param"] == param
    if status == 404:
        assert err["code"] == "model_not_found"
    code, answer = _post(
        server.url + "/v1/completions",
        {"model": "griffin-jax", "prompt": "def f():", "max_tokens": 4, "temperature": 0},
    )  # fmt: skip
    assert code == 200 and answer["choices"][0]["text"] is not None


def test_models_health_and_metric_names(server):
    code, text = _get(server.url + "/v1/models")
    assert code == 200 and json.loads(text)["data"][0]["id"] == "griffin-jax"
    assert _get(server.url + "/health")[0] == 200
    _, text = _get(server.url + "/metrics")
    for name in ("griffin_requests_total", "griffin_prompt_tokens_total",
                 "griffin_generation_tokens_total", "griffin_accepted_draft_tokens_total",
                 "griffin_verification_rounds_total", "griffin_queue_length",
                 "griffin_busy_slots", "griffin_time_to_first_token_seconds_bucket",
                 "griffin_inter_token_latency_seconds_bucket",
                 'griffin_round_overhead_milliseconds{batch="1"}'):  # fmt: skip
        assert name in text, name


def test_a_disconnect_frees_the_slot(server):
    cancelled = 'griffin_requests_total{outcome="cancelled"}'
    before = _metric(server, cancelled)
    body = {"model": "griffin-jax", "prompt": PROMPTS[2], "max_tokens": 150, "temperature": 0,
            "stream": True}  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", server.port))
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    seen = b""
    while b"data:" not in seen:  # streaming has started
        seen += sock.recv(4096)
    sock.close()
    deadline = time.time() + 60
    while _metric(server, cancelled) < before + 1 or _metric(server, "griffin_busy_slots") > 0:
        assert time.time() < deadline, "the slot was not freed"
        time.sleep(0.2)


def test_a_failing_round_fails_its_requests_and_the_server_goes_on(server, engine, monkeypatch):
    real = engine._run_rounds
    calls = []

    def broken():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real()

    monkeypatch.setattr(engine, "_run_rounds", broken)
    body = {"model": "griffin-jax", "prompt": "def g(x):", "max_tokens": 8, "temperature": 0}
    code, answer = _post(server.url + "/v1/completions", body)
    assert code == 500 and answer["error"]["type"] == "server_error"
    code, answer = _post(server.url + "/v1/completions", body)
    assert code == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert _get(server.url + "/health")[0] == 200


def test_a_full_queue_answers_at_once(server, engine, monkeypatch):
    monkeypatch.setattr(engine, "max_queue", 0)
    code, answer = _post(server.url + "/v1/completions",
                         {"model": "griffin-jax", "prompt": "x", "max_tokens": 2})  # fmt: skip
    assert code == 429 and answer["error"]["code"] == "queue_full"


def test_api_key(engine, model, monkeypatch):
    monkeypatch.setenv("GRIFFIN_API_KEY", "unused")  # the app takes its key as an argument
    srv = serve.ThreadedServer(serve.create_app(engine, model.tokenizer, api_key="s3cret"))
    try:
        body = {"model": "griffin-jax", "prompt": "def h():", "max_tokens": 2}
        code, answer = _post(srv.url + "/v1/completions", body)
        assert code == 401 and answer["error"]["code"] == "invalid_api_key"
        code, _ = _post(srv.url + "/v1/completions", body, {"Authorization": "Bearer s3cret"})
        assert code == 200
        assert _get(srv.url + "/health")[0] == 200  # only /v1 needs the key
        keyed = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert keyed.models.list().data[0].id == "griffin-jax"
    finally:
        srv.close()


def _eagle3_folder(model, folder: Path) -> Path:
    """A random EAGLE-3 draft for the default base in the published layout, with a small tree:
    it accepts little, so the server's output is the base's own (the plumbing is under test)."""
    dcfg = dataclasses.replace(model.dcfg, kind="eagle3", draft_vocab_size=1024)
    params = draft_lib.init_draft_params(dcfg, jax.random.key(3))
    top = np.sort(model.vocab_ranking[:1024])  # the 1024 most frequent ids, as training maps them
    params["d2t"] = jnp.asarray(top - np.arange(1024), jnp.int32)
    export_draft(params, model.base_params["embed_tokens"]["embedding"], dcfg, folder,
                 base_cfg=model.cfg)  # fmt: skip
    (folder / "tree.json").write_text(json.dumps({"top_k": 2, "depth": 2, "total_tokens": 6}))
    return folder


def test_the_command_serves_an_eagle3_draft_and_exits_cleanly_on_sigterm(model, tmp_path: Path):
    """`python -m inference.serve` as a user starts it, here with an EAGLE-3 draft folder (own
    draft vocabulary, three base layers): greedy text equals plain decoding; SIGTERM exits 0."""
    draft = _eagle3_folder(model, tmp_path / "eagle3")
    port = _free_port()
    env = dict(os.environ, GRIFFIN_API_KEY="k")
    proc = subprocess.Popen(
        [sys.executable, "-m", "inference.serve", "--port", str(port), "--max-batch", "2",
         "--max-model-len", "128", "--log-level", "warning", "--draft", str(draft)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while True:
            try:
                if _get(url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline
            time.sleep(0.5)
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        out = c.completions.create(model="griffin-jax", prompt=PROMPTS[0], max_tokens=40,
                                   temperature=0)  # fmt: skip
        assert out.choices[0].text == _alone(model, PROMPTS[0], 40)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--max-batch", "0"], "--max-batch must be an integer >= 1"),
        (["--speculative-num-steps", "0"], "--speculative-num-steps must be an integer >= 1"),
        (["--chat-template", "/no/such/file"], "--chat-template /no/such/file: no such file"),
        (["--port", "x"], "argument --port: invalid int value"),
        (["--chunked-prefill-size", "8"], "--chunked-prefill-size must be 0 (off) or >= 16"),
    ],
)
def test_bad_flags_are_one_line_errors_before_loading(argv, message, capsys):
    from griffin_jax import cli

    assert cli.run(serve.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
