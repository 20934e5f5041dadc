"""`mixkit serve` as a live process on a free loopback port, driven by the
official `openai` client and by raw HTTP: completions and chat, streamed and
not, against offline generation on the same weights; faults (malformed JSON,
invalid UTF-8, unknown model, a prompt over the context, max_tokens <= 0,
clients that disconnect mid-stream, 64 concurrent streams), after each of
which the block manager's free pages are back to the total; and SIGTERM
while requests run: they finish, then the process exits 0."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

# Whole-program tests: each starts server processes (tens of seconds).
pytestmark = pytest.mark.slow

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from mixkit import models  # noqa: E402
from mixkit.serve import LLM, SamplingParams  # noqa: E402
from mixkit.tokenizer import ByteTokenizer, encode_chat, load_tokenizer  # noqa: E402

NAME = "tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-model")
    args = models.CONFIGS["tiny-mistral"].replace(vocab_size=258, max_seq_len=256)
    models.save(models.Transformer(args).init_weights(0, std=0.1), d)
    ByteTokenizer().save(d)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, *extra):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mixkit", "serve", "--model", str(model_dir), "--port", str(port),
                             "--served-model-name", NAME, "--max-batch", "16", "--kv-pages", "96", "--page-size", "8",
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mixkit serve exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("mixkit serve did not come up")


@pytest.fixture(scope="module")
def server(model_dir):
    proc, url = start_server(model_dir)
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def pages(url) -> tuple[int, int]:
    text = httpx.get(url + "/metrics").text
    free = int(re.search(r"mixkit_kv_pages_free\{[^}]*\} (\d+)", text).group(1))
    total = int(re.search(r"mixkit_kv_pages_total\{[^}]*\} (\d+)", text).group(1))
    return free, total


def generated(url) -> int:
    return int(re.search(r"mixkit_generation_tokens_total (\d+)", httpx.get(url + "/metrics").text).group(1))


def assert_all_free(url, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        free, total = pages(url)
        running = re.search(r"mixkit_requests_running (\d+)", httpx.get(url + "/metrics").text).group(1)
        if free == total and running == "0":
            return
        time.sleep(0.1)
    raise AssertionError(f"pages not returned: {pages(url)}")


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(str(model_dir), device="cpu", num_pages=96, page_size=8)


def test_openai_client_completions_and_chat(server, offline):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [NAME]
    want = offline.generate(["def main("], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].text
    got = client.completions.create(model=NAME, prompt="def main(", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want and got.usage.completion_tokens == 12
    assert got.choices[0].finish_reason == "length"
    stream = client.completions.create(model=NAME, prompt="def main(", max_tokens=12, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream) == want

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ids = encode_chat(load_tokenizer(offline.engine.tokenizer.path.parent), messages)[0]
    want = offline.generate([ids], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].text
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want

    lp = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                        extra_body={"ignore_eos": True})
    assert len(lp.choices[0].logprobs.content) == 4 and all(t.logprob <= 0 for t in lp.choices[0].logprobs.content)
    assert_all_free(server)


def test_errors_have_openai_shape_and_the_server_keeps_serving(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        client.completions.create(model=NAME, prompt="x" * 300, max_tokens=2)
    for bad in (0, -3):
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.completions.create(model=NAME, prompt="x", max_tokens=bad)
    with pytest.raises(openai.BadRequestError, match="role 'assistant'"):
        client.chat.completions.create(model=NAME, messages=[{"role": "assistant", "content": "x"}])
    cases = [b"{not json", b'{"model": "tiny", "prompt": "\xff\xfe"}', b"[1, 2]", b'{"prompt": 5}',
             b'{"prompt": "x", "temperature": "hot"}', b'{"prompt": "x", "n": 2}']
    for body in cases:
        r = httpx.post(server + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, body
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    r = httpx.get(server + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert client.completions.create(model=NAME, prompt="ok", max_tokens=2).choices[0].text is not None
    assert_all_free(server)


def _stream(url, prompt, n, out, i, stop_after=None):
    body = {"model": NAME, "prompt": prompt, "max_tokens": n, "temperature": 0.7, "seed": i, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        lines = []
        for line in r.iter_lines():
            if line:
                lines.append(line)
            if stop_after is not None and len(lines) >= stop_after:
                return  # leaves mid-stream: the connection closes
        out[i] = lines


def test_64_concurrent_streams(server):
    out = {}
    threads = [threading.Thread(target=_stream, args=(server, f"req {i}: ", 6, out, i)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(out) == 64
    for lines in out.values():
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(x[6:]) for x in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert_all_free(server)


def test_clients_that_disconnect_mid_stream(server):
    threads = [threading.Thread(target=_stream, args=(server, "abc", 200, {}, i, 2)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # Non-streaming clients that give up: each sends its request and closes the
    # connection once the server holds pages for it (or at once, if the request
    # is already done: on an idle machine 250 tokens of this model take well
    # under a second, so whether it is aborted or finishes is a race, and both
    # must end with every page back).
    before = generated(server)
    body = json.dumps({"prompt": "x", "max_tokens": 250, "ignore_eos": True}).encode()
    host, port = server.removeprefix("http://").split(":")
    socks = []
    for _ in range(4):
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
        socks.append(s)
    deadline = time.time() + 30
    while time.time() < deadline and pages(server)[0] == pages(server)[1] and generated(server) < before + 4 * 250:
        time.sleep(0.01)
    for s in socks:
        s.close()
    assert_all_free(server, timeout=60)
    r = httpx.post(server + "/v1/completions", json={"prompt": "still", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200


def test_sigterm_drains_running_requests_then_exits_0(model_dir):
    proc, url = start_server(model_dir)
    out = {}
    threads = [threading.Thread(target=_stream, args=(url, "go", 30, out, i)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while time.time() < deadline and pages(url)[0] == pages(url)[1]:
        time.sleep(0.05)  # until the requests hold pages
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert proc.wait(120) == 0
    assert len(out) == 4 and all(lines[-1] == "data: [DONE]" for lines in out.values())
    for lines in out.values():
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mixkit", "serve", "--model", str(tmp_path / "none")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("mixkit serve: error:") and "Traceback" not in r.stderr


def test_tensor_parallel_server_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m mixkit serve --tp 2` on gloo: rank 0
    serves the one-process text; a SIGTERM to torchrun drains both ranks."""
    d = tmp_path / "model"
    args = models.CONFIGS["tiny-llama"].replace(vocab_size=258, n_heads=4, n_kv_heads=2, head_dim=32)
    models.save(models.Transformer(args).init_weights(0, std=0.1), d)
    ByteTokenizer().save(d)
    want = LLM(str(d), device="cpu").generate("hello", SamplingParams(max_tokens=8, temperature=0,
                                                                      ignore_eos=True))[0].text
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "mixkit", "serve", "--model", str(d), "--tp", "2", "--port", str(port)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        r = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 8, "temperature": 0,
                                                      "ignore_eos": True}, timeout=120)
        assert r.json()["choices"][0]["text"] == want
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0]
    assert "drained and stopped" in out, out[-3000:]
