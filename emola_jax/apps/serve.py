"""`run.py serve`: EmoLA behind an OpenAI-compatible API, a per-face endpoint and a web page.

    POST /v1/chat/completions   OpenAI's schema: one user message holding the question and one image
                                as a `data:` URL; max_tokens, temperature, top_p, stop, seed, stream
    GET  /v1/models             the one model served
    POST /v1/faces              a photo (multipart `file`, or JSON `{"image": "data:..."}`) -> every
                                face found, with its box, score, answers and the official readings,
                                as `run.py analyze` writes them
    GET  /health                rows busy, requests waiting; requests admitted, seconds queued and prefilling
    GET  /                      a page: drop a photo, see its faces boxed and labelled

Every answer comes from one `serving.Engine` (continuous batching), so a request's answer is the
one `run.py generate` gives for the same image, question and seed, whatever else is in flight. The
image's prior feature is computed as `generate` computes it (the whole image; 2d106det with the
landmark graph, the dlib priors with dlib). Errors are OpenAI's error JSON naming the field, with
4xx codes; the server fetches nothing (an `http(s)` image URL is refused), reads at most
`max_body` bytes of a request, and with an API key answers only `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from emola_jax.apps.annotate import QUESTIONS, reading
from emola_jax.data.faces import FaceFinder
from emola_jax.data.image import decode_rgb
from emola_jax.predictor import ImageInputs
from emola_jax.serving import Engine, QueueFull, Stream
from emola_jax.serving import Request as EngineRequest

MAX_BODY = 20 * 1024 * 1024  # bytes of one request: a photo as a data: URL is about 4/3 of its file
MAX_STOPS = 4  # as OpenAI allows


class ApiError(Exception):
    """A refused request: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, *, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


class Server:
    """The engine, the image inputs of its model (`ImageInputs` of the engine's config, made before
    the model loads so that a missing landmark graph is said first), and the face finder of
    `/v1/faces`."""

    def __init__(self, engine: Engine, inputs: ImageInputs, *, name: str, max_new_tokens: int = 512):
        self.engine, self.name = engine, name
        self.predictor = engine.predictor
        self.inputs = inputs
        self.max_new_tokens = max_new_tokens
        self._finder: FaceFinder | None = None

    @property
    def finder(self) -> FaceFinder:
        if self._finder is None:  # dlib (the faces extra) only where faces are asked for
            self._finder = FaceFinder("hog")
        return self._finder

    # ------------------------------------------------------------------ one question, one image

    def request(self, question: str, rgb: np.ndarray, *, max_tokens: int | None, temperature: float, top_p: float,
                seed: int, where: str) -> EngineRequest:
        """The engine's request for `question` about `rgb`; ApiError naming the field (`where`: the
        image's) when it cannot run."""
        prompt = self.predictor.prompt_ids(question)
        new_tokens = max_tokens if max_tokens is not None else self.default_length(prompt)
        try:
            features = self.inputs.features([rgb], [where])
        except ValueError as err:
            raise ApiError(400, str(err), where) from None
        request = EngineRequest(prompt=prompt, pixels=self.inputs.pixels([rgb])[0],
                                landmarks=None if features is None else features[0], max_new_tokens=new_tokens,
                                temperature=temperature, top_p=top_p, seed=seed)
        try:
            self.engine.check(request)
        except ValueError as err:
            raise ApiError(400, str(err), "max_tokens" if "context" in str(err) else "messages") from None
        return request

    def default_length(self, prompt: np.ndarray) -> int:
        """An answer's length where a request gives none: `max_new_tokens`, or what the context leaves
        after `prompt` where that is less (as `generate`'s default)."""
        room = self.engine.config.text.max_position_embeddings - len(prompt)
        return max(1, min(self.max_new_tokens, room))

    def submit(self, request: EngineRequest) -> Stream:
        try:
            return self.engine.submit(request)
        except QueueFull as err:
            raise ApiError(429, f"the server is busy ({err}); retry shortly", kind="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None

    def text(self, tokens: list[int]) -> str:
        return self.predictor.tokenizer.decode(tokens, skip_special_tokens=True).strip()


# ---------------------------------------------------------------------- reading requests


def _field(body: dict, name: str, kind, default=None, *, check=None, wanted: str = ""):
    """`body[name]` of JSON type `kind` (None: absent or null -> `default`); ApiError naming it."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ApiError(400, f"{name} must be {wanted or kind.__name__}, not {json.dumps(value)[:60]}", name)
    if check is not None and not check(value):
        raise ApiError(400, f"{name} must be {wanted}, not {json.dumps(value)[:60]}", name)
    return value


def image_from_url(url, where: str) -> np.ndarray:
    """The RGB pixels of a `data:` URL; ApiError naming `where` for anything else."""
    if not isinstance(url, str):
        raise ApiError(400, f"{where} must be a data: URL string", where)
    if url.startswith(("http://", "https://")):
        raise ApiError(400, "the server fetches nothing: send the image itself as a data: URL "
                       "(data:image/png;base64,...)", where)
    head, comma, data = url.partition(",")
    if not url.startswith("data:") or not comma or not head.endswith(";base64"):
        raise ApiError(400, "the image must be a base64 data: URL (data:image/png;base64,...)", where)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, f"the image's data: URL is not valid base64 ({err})", where) from None
    return image_bytes(raw, where)


def image_bytes(raw: bytes, where: str) -> np.ndarray:
    try:
        return decode_rgb(io.BytesIO(raw))
    except ValueError as err:
        reason = str(err).split(": ", 1)[-1]
        raise ApiError(400, f"the image ({len(raw):,} bytes) cannot be read: {reason}", where) from None


def parse_chat(body: dict) -> tuple[str, np.ndarray, str]:
    """(question, image, the image's field) of a chat request: one user message whose content
    holds text and exactly one `image_url` part. ApiError naming the field otherwise."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        raise ApiError(400, "EmoLA answers one question about one image: give one message, role user (its "
                       "system prompt is the model's own)", "messages")
    content = messages[0].get("content")
    if not isinstance(content, list):
        raise ApiError(400, "the message's content must be a list of parts: text and one image_url",
                       "messages[0].content")
    texts, images = [], []
    for i, part in enumerate(content):
        where = f"messages[0].content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            images.append((url.get("url") if isinstance(url, dict) else url, f"{where}.image_url.url"))
        else:
            raise ApiError(400, 'a content part is {"type": "text", "text": ...} or {"type": "image_url", '
                           '"image_url": {"url": "data:..."}}', where)
    if len(images) != 1:
        raise ApiError(400, f"the message must hold exactly one image_url part, not {len(images)}",
                       "messages[0].content")
    question = "\n".join(texts).strip()
    if not question:
        raise ApiError(400, "the message holds no question (a text part)", "messages[0].content")
    url, where = images[0]
    return question, image_from_url(url, where), where


def parse_settings(body: dict, name: str) -> dict:
    """The decoding settings of a chat request, each range-checked; ApiError naming the field."""
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string (GET /v1/models lists it)", "model")
    if model != name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {name!r}", "model",
                       code="model_not_found")
    if _field(body, "n", int, 1) != 1:
        raise ApiError(400, "n must be 1", "n")
    max_tokens = _field(body, "max_completion_tokens", int, None, check=lambda v: v >= 1, wanted="an integer >= 1")
    max_tokens = _field(body, "max_tokens", int, max_tokens, check=lambda v: v >= 1, wanted="an integer >= 1")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOPS} non-empty strings", "stop")
    options = body.get("stream_options") or {}
    return {
        "max_tokens": max_tokens,
        "temperature": _field(body, "temperature", float, 0.0, check=lambda v: 0 <= v <= 2,
                              wanted="a number in [0, 2]"),
        "top_p": _field(body, "top_p", float, 1.0, check=lambda v: 0 < v <= 1, wanted="a number in (0, 1]"),
        "seed": _field(body, "seed", int, 0, check=lambda v: 0 <= v < 2**32, wanted="an integer in [0, 2**32)"),
        "stream": _field(body, "stream", bool, False, wanted="true or false"),
        "usage": isinstance(options, dict) and options.get("include_usage") is True,
        "stop": stops,
    }


async def _tokens(stream: Stream) -> AsyncIterator[int]:
    """The stream's tokens without blocking the event loop; the request is cancelled (its row
    freed) when the client goes away."""
    tokens = iter(stream)
    try:
        while True:
            token = await anyio.to_thread.run_sync(next, tokens, None, abandon_on_cancel=True)
            if token is None:
                return
            yield token
    finally:
        stream.cancel()


async def text_deltas(server: Server, stream: Stream, stops: list[str]) -> AsyncIterator[str]:
    """The answer as it grows (`generate`'s text: special tokens skipped, stripped), cut before the
    first stop string, which ends the request."""
    tokens, sent = [], ""
    async for token in _tokens(stream):
        tokens.append(token)
        text = server.text(tokens)
        if text.endswith("\ufffd"):  # half a character: wait for the rest of its bytes
            continue
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut].rstrip()
            stream.cancel()
            stream.finish_reason = "stop"
        if text.startswith(sent) and len(text) > len(sent):
            yield text[len(sent):]
            sent = text
        if cut >= 0:
            return


def _usage(request: EngineRequest, stream: Stream) -> dict:
    return {"prompt_tokens": len(request.prompt), "completion_tokens": stream.generated,
            "total_tokens": len(request.prompt) + stream.generated}


# ---------------------------------------------------------------------- the application


def create_app(server: Server, *, api_key: str | None = None, max_body: int = MAX_BODY, log=None) -> FastAPI:
    """The FastAPI application over `server`. `log(line)`: one line per request (default: stderr)."""
    app = FastAPI(title="emola-jax", docs_url=None, redoc_url=None)
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.perf_counter()
        try:
            if api_key is not None and request.url.path.startswith("/v1/"):
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                    raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY",
                                   kind="authentication_error", code="invalid_api_key")
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > max_body):
                raise ApiError(413, f"the request body may hold at most {max_body:,} bytes, not {length}",
                               kind="invalid_request_error", code="request_too_large")
            response = await call_next(request)
        except ApiError as err:
            response = err.response()
        log(f"{request.client.host if request.client else '-'} {request.method} {request.url.path} "
            f"{response.status_code} {1000 * (time.perf_counter() - start):.0f} ms")
        return response

    async def read_json(request: Request) -> dict:
        body = await _body(request, max_body)
        try:
            data = json.loads(body)
        except ValueError as err:
            raise ApiError(400, f"the body is not JSON ({err})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data

    @app.exception_handler(ApiError)
    async def refused(_: Request, err: ApiError):
        return err.response()

    @app.get("/health")
    async def health():
        engine = server.engine
        return {"status": "ok", "model": server.name, "rows": engine.rows, "busy": engine.busy_rows,
                "waiting": engine.waiting, "cancelled": engine.cancelled, **engine.timing}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0,
                                             "owned_by": "emola-jax"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request)
        settings = parse_settings(body, server.name)
        question, rgb, where = await anyio.to_thread.run_sync(parse_chat, body)
        engine_request = await anyio.to_thread.run_sync(lambda: server.request(
            question, rgb, max_tokens=settings["max_tokens"], temperature=settings["temperature"],
            top_p=settings["top_p"], seed=settings["seed"], where=where))
        stream = server.submit(engine_request)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not settings["stream"]:
            text = "".join([delta async for delta in text_deltas(server, stream, settings["stop"])])
            return {"id": ident, "object": "chat.completion", "created": created, "model": server.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": stream.finish_reason, "logprobs": None}],
                    "usage": _usage(engine_request, stream)}

        def chunk(delta: dict, finish: str | None = None, **more) -> str:
            data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": server.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **more}
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for delta in text_deltas(server, stream, settings["stop"]):
                    yield chunk({"content": delta})
                yield chunk({}, stream.finish_reason)
                if settings["usage"]:
                    data = {"id": ident, "object": "chat.completion.chunk", "created": created,
                            "model": server.name, "choices": [], "usage": _usage(engine_request, stream)}
                    yield f"data: {json.dumps(data)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                stream.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/faces")
    async def faces(request: Request):
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=4)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "send the photo as the form's file field", "file")
            rgb = await anyio.to_thread.run_sync(image_bytes, await upload.read(), "file")
        else:
            body = await read_json(request)
            rgb = await anyio.to_thread.run_sync(image_from_url, body.get("image"), "image")
        return await _faces(server, rgb)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE

    return app


async def _body(request: Request, limit: int) -> bytes:
    """The request's body, refused past `limit` bytes (a body sent without a length too)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body may hold at most {limit:,} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _faces(server: Server, rgb: np.ndarray) -> dict:
    """Every face of `rgb` as `run.py analyze` reads it: found and aligned by dlib, its prior on
    the aligned crop, both questions answered by the engine (greedy), the official readings."""
    finder = server.finder
    found = await anyio.to_thread.run_sync(lambda: [finder.align(rgb, d) for d in finder.detect(rgb)])
    if not found:
        return {"width": int(rgb.shape[1]), "height": int(rgb.shape[0]), "faces": []}
    chips = [f.chip for f in found]
    features = await anyio.to_thread.run_sync(
        server.inputs.features, chips, [f"face {n}" for n in range(1, len(chips) + 1)])
    pixels = server.inputs.pixels(chips)
    prompts = {name: server.predictor.prompt_ids(question) for name, question in QUESTIONS.items()}
    streams = {(n, name): server.submit(EngineRequest(
        prompt=prompt, pixels=pixels[n], landmarks=None if features is None else features[n],
        max_new_tokens=server.default_length(prompt))) for n in range(len(found)) for name, prompt in prompts.items()}
    answers = {}
    for key, stream in streams.items():
        tokens = [t async for t in _tokens(stream)]
        answers[key] = (server.text(tokens), stream.finish_reason == "stop")
    faces = []
    for n, face in enumerate(found):
        read = reading(answers[n, "emotion"], answers[n, "au"], 0.0)
        read.pop("answer_seconds")
        faces.append({"face": n + 1, "box": list(face.detection.box), "score": round(float(face.detection.score), 4),
                      **read})
    return {"width": int(rgb.shape[1]), "height": int(rgb.shape[0]), "faces": faces}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>EmoLA</title>
<style>
body{font-family:sans-serif;margin:2em;max-width:1200px}
#drop{border:2px dashed #888;padding:2em;text-align:center;cursor:pointer}
#drop.over{background:#eef}
#view{display:flex;gap:2em;margin-top:1em;align-items:flex-start}
canvas{max-width:60%;height:auto}
td,th{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
</style></head>
<body>
<h1>EmoLA: facial affect in a photo</h1>
<div id="drop">Drop a photo here, or <label><u>pick one</u><input id="file" type="file" accept="image/*"
hidden></label>. <input id="key" type="password" placeholder="API key (if the server asks)"></div>
<p id="status"></p>
<div id="view"><canvas id="photo"></canvas>
<div><p>Faces: <span id="count">-</span></p><table id="faces"><thead><tr><th>#</th><th>emotion</th><th>AUs</th>
<th>answers</th></tr></thead><tbody></tbody></table></div></div>
<script>
const drop = document.getElementById("drop"), status = document.getElementById("status");
function label(face) {
  const emotion = face.emotion_named ? face.emotion : face.emotion + " (fallback: no emotion named)";
  return face.face + ": " + emotion + "; " + (face.aus.join(" ") || "no AUs");
}
async function analyse(file) {
  status.textContent = "analysing " + file.name + " ...";
  document.getElementById("count").textContent = "-";
  const body = new FormData(); body.append("file", file);
  const key = document.getElementById("key").value;
  const reply = await fetch("/v1/faces", {method: "POST", body,
    headers: key ? {"Authorization": "Bearer " + key} : {}});
  const data = await reply.json();
  if (!reply.ok) { status.textContent = "error: " + data.error.message; return; }
  const image = await createImageBitmap(file, {imageOrientation: "from-image"});
  const canvas = document.getElementById("photo"), context = canvas.getContext("2d");
  canvas.width = data.width; canvas.height = data.height;
  context.drawImage(image, 0, 0, data.width, data.height);
  const line = Math.max(2, Math.round(Math.max(data.width, data.height) / 400));
  const size = Math.max(12, Math.round(Math.max(data.width, data.height) / 60));
  context.font = size + "px sans-serif"; context.lineWidth = line;
  const rows = document.querySelector("#faces tbody"); rows.innerHTML = "";
  for (const face of data.faces) {
    const [left, top, right, bottom] = face.box;
    context.strokeStyle = "rgb(255,64,32)"; context.strokeRect(left, top, right - left, bottom - top);
    const text = label(face), width = context.measureText(text).width + 2 * line;
    const y = top - size - 2 * line >= 0 ? top - size - 2 * line : bottom + line;
    const x = Math.max(0, Math.min(left, data.width - width));
    context.fillStyle = "rgb(255,64,32)"; context.fillRect(x, y, width, size + 2 * line);
    context.fillStyle = "white"; context.fillText(text, x + line, y + size);
    const row = rows.insertRow();
    row.className = "face";
    for (const value of [face.face, face.emotion_named ? face.emotion : face.emotion + " (fallback)",
                         face.aus.join(" ") || "none", face.emotion_answer + " / " + face.au_answer]) {
      row.insertCell().textContent = value;
    }
  }
  document.getElementById("count").textContent = data.faces.length;
  status.textContent = data.faces.length + " face(s) in " + file.name;
}
document.getElementById("file").addEventListener("change", e => e.target.files[0] && analyse(e.target.files[0]));
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) analyse(e.dataTransfer.files[0]); });
</script></body></html>
"""
