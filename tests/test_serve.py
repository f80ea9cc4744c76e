"""`run.py serve` as a user runs it: the demo's trained model behind the API on the loopback
address, asked through the official `openai` client and plain HTTP; every answer is compared with
what `run.py generate`'s engine (`Predictor`, the same prompt, image, prior and seed) gives alone."""

import base64
import concurrent.futures
import io
import json
import shutil
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from tests.processes import ROOT, RUN, cpu_env, free_port

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key-0123"
EMOTION = "What emotions are conveyed by this face?"
AU = "What AUs are conveyed by this face?"


@pytest.fixture(scope="module")
def server(demo_run, tmp_path_factory):
    """`run.py serve` on the demo's model over 2 devices (4 rows, 2 on each; a queue of 2; an API key):
    (url, workdir, log)."""
    workdir, demo = demo_run
    assert demo.returncode == 0, demo.stderr[-2000:]
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([*RUN, "serve", "--ckpt", str(workdir / "run" / "model"), "--onnx",
                                    str(workdir / "landmark_model.onnx"), "--port", str(port), "--rows", "4",
                                    "--queue", "2", "--api-key", KEY, "--name", "emola-demo"],
                                   cwd=ROOT, env=cpu_env(2), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    yield url, workdir, log
    process.terminate()
    process.wait(timeout=30)


def _faces(workdir, count: int) -> list:
    records = json.loads((workdir / "faces" / "eval_emotion_anno.json").read_text())
    return [workdir / "faces" / r["image"] for r in records[:count]]


def _data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _message(question: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def _expected(workdir, image, question, *, max_new_tokens=None, temperature=0.0, top_p=1.0, seed=0,
              ended=False):
    """`run.py generate`'s answer, computed as it computes it (`ended`: with whether EOS ended it)."""
    from emola_jax.checkpoint import load_tokenizer
    from emola_jax.data.conversation import pad_token_id
    from emola_jax.data.priors import image_feature
    from emola_jax.generate import GenerationConfig
    from emola_jax.predictor import Predictor

    model = workdir / "run" / "model"
    tokenizer = load_tokenizer(model)
    generation = GenerationConfig(max_new_tokens=max_new_tokens or 512, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=pad_token_id(tokenizer), temperature=temperature, top_p=top_p)
    predictor = Predictor(model, generation=generation, fit_context=max_new_tokens is None, seed=seed)
    feature = image_feature(image, onnx=workdir / "landmark_model.onnx", priors=predictor.config.priors)
    if ended:
        return predictor.answer_batch(question, predictor.pixels(image)[None], feature[None])[0]
    return predictor.answer(image, question, feature)


def test_answers_are_generates_whatever_else_is_in_flight(server):
    url, workdir, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["emola-demo"]
    faces = _faces(workdir, 4)
    asks = [dict(image=faces[0], question=EMOTION), dict(image=faces[1], question=AU),
            dict(image=faces[2], question=EMOTION, max_new_tokens=5),
            dict(image=faces[3], question=AU, temperature=0.9, top_p=0.8, seed=7),
            dict(image=faces[1], question=EMOTION, stream=True), dict(image=faces[2], question=AU, stream=True)]

    def ask(a):
        settings = dict(max_tokens=a.get("max_new_tokens"), temperature=a.get("temperature", 0.0),
                        top_p=a.get("top_p", 1.0), seed=a.get("seed", 0))
        messages = _message(a["question"], _data_url(a["image"]))
        if not a.get("stream"):
            reply = client.chat.completions.create(model="emola-demo", messages=messages, **settings)
            return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage
        chunks = list(client.chat.completions.create(model="emola-demo", messages=messages, stream=True,
                                                     stream_options={"include_usage": True}, **settings))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason), \
            chunks[-1].usage

    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:  # all in flight at once: 4 rows, 2 waiting
        replies = list(pool.map(ask, asks))
    for a, (text, finish, usage) in zip(asks, replies, strict=True):
        expected = _expected(workdir, a["image"], a["question"], max_new_tokens=a.get("max_new_tokens"),
                             temperature=a.get("temperature", 0.0), top_p=a.get("top_p", 1.0), seed=a.get("seed", 0))
        assert text == expected, a
        assert finish == ("length" if a.get("max_new_tokens") else "stop"), (a, finish)
        assert usage.prompt_tokens > 16 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert replies[2][2].completion_tokens == 5


def test_the_readmes_client_snippet(server, capsys):
    from tests.test_readme import readme_block

    url, workdir, _ = server
    face = _faces(workdir, 1)[0]
    code = readme_block("With OpenAI's own client").replace("http://127.0.0.1:8000", url).replace(
        '"KEY"', repr(KEY)).replace('"emola-7b"', '"emola-demo"').replace('"face.png"', repr(str(face)))
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's code, as a reader runs it
    assert capsys.readouterr().out.strip() == _expected(workdir, face, EMOTION)


def _long_seed(workdir, image) -> int:
    """A seed whose answer at temperature 2 runs 300 tokens without EOS: a request that stays."""
    for seed in range(16):
        _, stopped = _expected(workdir, image, EMOTION, max_new_tokens=300, temperature=2.0, seed=seed, ended=True)
        if not stopped:
            return seed
    raise AssertionError("no long answer among 16 seeds")


def test_a_full_queue_says_429_and_a_client_that_leaves_frees_its_row(server):
    url, workdir, log = server
    face = _faces(workdir, 1)[0]
    seed = _long_seed(workdir, face)
    body = {"model": "emola-demo", "messages": _message(EMOTION, _data_url(face)), "max_tokens": 300,
            "temperature": 2.0, "seed": seed, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=60) as http:
        before = http.get(f"{url}/health").json()
        streams = [http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) for _ in range(6)]
        opened = [s.__enter__() for s in streams]  # 4 rows decoding, 2 waiting
        try:
            assert all(r.status_code == 200 for r in opened)
            refused = http.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, headers=headers)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            first = next(opened[0].iter_lines())
            assert first.startswith("data: ")
        finally:
            for s in streams:
                s.__exit__(None, None, None)  # every client goes away mid-answer
        deadline = time.monotonic() + 20
        while (health := http.get(f"{url}/health").json())["busy"] or health["waiting"]:
            assert time.monotonic() < deadline, health
            time.sleep(0.05)
        assert health["cancelled"] - before["cancelled"] == 6  # each freed before its 300 tokens
        # the four that decoded were admitted (the two waiting ones too, unless they left before a row freed)
        assert 4 <= health["admitted"] - before["admitted"] <= 6
        assert health["prefill_seconds"] > before["prefill_seconds"]
        assert health["queue_seconds"] >= before["queue_seconds"]
    assert "POST /v1/chat/completions 429" in log.read_text()


def test_bad_requests_are_named_and_the_good_ones_beside_them_answered(server):
    url, workdir, _ = server
    face = _faces(workdir, 1)[0]
    good = {"model": "emola-demo", "messages": _message(EMOTION, _data_url(face))}
    headers = {"Authorization": f"Bearer {KEY}"}
    png = face.read_bytes()
    image_field = "messages[0].content[1].image_url.url"
    bad = [
        ({**good, "max_tokens": 100000}, 400, "max_tokens", "exceeds the model's context of 512 positions"),
        ({**good, "messages": _message(EMOTION, "data:image/png;base64," + base64.b64encode(b"hello").decode())},
         400, image_field, "cannot be read"),
        ({**good, "messages": _message(EMOTION, "data:image/png;base64," + base64.b64encode(png[:200]).decode())},
         400, image_field, "cannot be read"),
        ({**good, "messages": _message(EMOTION, "https://example.com/face.png")}, 400, image_field,
         "the server fetches nothing"),
        ({**good, "messages": _message(EMOTION, "data:image/png;base64,@@@")}, 400, image_field, "not valid base64"),
        ({"model": "emola-demo"}, 400, "messages", "messages must be a non-empty list"),
        ({**good, "temperature": "hot"}, 400, "temperature", "temperature must be a number in [0, 2]"),
        ({**good, "top_p": 0}, 400, "top_p", "top_p must be a number in (0, 1]"),
        ({**good, "model": "gpt-4o"}, 404, "model", "does not exist"),
        ({**good, "messages": [{"role": "user", "content": "no image"}]}, 400, "messages[0].content", "list of parts"),
    ]
    with httpx.Client(timeout=120) as http, concurrent.futures.ThreadPoolExecutor(4) as pool:
        answer = pool.submit(http.post, f"{url}/v1/chat/completions", json=good, headers=headers)
        for body, status, param, words in bad:
            reply = http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            error = reply.json()["error"]
            assert reply.status_code == status and error["param"] == param and words in error["message"], \
                (param, reply.status_code, error)
        big = http.post(f"{url}/v1/chat/completions", content=b"x" * (30 * 1024 * 1024),
                        headers={**headers, "Content-Type": "application/json"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        for given in ({}, {"Authorization": "Bearer wrong"}):
            denied = http.post(f"{url}/v1/chat/completions", json=good, headers=given)
            assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        assert http.get(f"{url}/health").status_code == 200  # health and the page need no key
        assert answer.result().status_code == 200
        assert answer.result().json()["choices"][0]["message"]["content"] == _expected(workdir, face, EMOTION)


def test_faces_endpoint_reads_a_photo_as_analyze_does(server, tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    url, workdir, _ = server
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    analyzed = subprocess.run([*RUN, "analyze", str(photo), "--ckpt", str(workdir / "run" / "model"), "--onnx",
                               str(workdir / "landmark_model.onnx"), "--out", str(tmp_path / "out"),
                               "--no-progress"], capture_output=True, text=True, cwd=ROOT, env=cpu_env(1))
    assert analyzed.returncode == 0, analyzed.stderr[-2000:]
    expected = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    with httpx.Client(timeout=120) as http:
        reply = http.post(f"{url}/v1/faces", files={"file": ("astronaut.png", photo.read_bytes(), "image/png")},
                          headers={"Authorization": f"Bearer {KEY}"})
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert (data["width"], data["height"]) == (512, 512) and len(data["faces"]) == len(expected) == 2
        for face, want in zip(data["faces"], expected, strict=True):
            assert face["box"] == want["box"] and abs(face["score"] - want["score"]) < 1e-3
            for key in ("emotion", "emotion_named", "aus", "emotion_answer", "au_answer"):
                assert face[key] == want[key], key
        as_json = http.post(f"{url}/v1/faces", json={"image": _data_url(photo)},
                            headers={"Authorization": f"Bearer {KEY}"})
        assert as_json.json() == data
    # the page, in a real headless browser: pick the photo, wait for the answer, read what it shows
    shown = _page_in_chromium(url, photo, tmp_path / "page.png")
    assert shown["count"] == str(len(expected))
    assert shown["rows"] == [[str(n), w["emotion"] if w["emotion_named"] else f"{w['emotion']} (fallback)",
                              " ".join(w["aus"]) or "none", f"{w['emotion_answer']} / {w['au_answer']}"]
                             for n, w in enumerate(expected, 1)]


CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]  # nothing leaves the machine


def _page_in_chromium(url: str, photo, screenshot) -> dict:
    """Debian's chromium, driven by playwright (which downloads no browser of its own)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = shutil.which("chromium")
    assert executable, "the browser test needs Debian's chromium: apt-get install chromium (.ci/run installs it)"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(url)
            page.fill("#key", KEY)
            page.set_input_files("#file", str(photo))
            page.wait_for_function("document.getElementById('count').textContent !== '-'", timeout=120_000)
            page.screenshot(path=str(screenshot), full_page=True)
            rows = page.eval_on_selector_all("#faces tbody tr", "rows => rows.map(r => [...r.cells].map(c => "
                                                                 "c.textContent))")
            return {"count": page.text_content("#count"), "rows": rows, "status": page.text_content("#status")}
        finally:
            browser.close()


def test_the_image_decodes_as_the_file_generate_reads(tmp_path):
    """A data: URL's bytes give the pixels `run.py generate` reads from the same file."""
    from emola_jax.apps.serve import image_from_url
    from emola_jax.data.image import decode_rgb

    rgb = (np.arange(48 * 40 * 3) % 251).astype(np.uint8).reshape(48, 40, 3)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    (tmp_path / "a.png").write_bytes(buffer.getvalue())
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    np.testing.assert_array_equal(image_from_url(url, "image"), decode_rgb(tmp_path / "a.png"))
