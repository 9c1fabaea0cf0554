"""``transfusion-mot demo --ckpt RUN``: a one-page web demo of a trained model: prompt -> images (steps, CFG,
seed, number of images), uploaded image -> caption.

FastAPI + uvicorn (the ``[demo]`` extra, ~19 MB, imported in ~0.6 s) rather than Gradio (~340 MB in a fresh
venv, 27 packages beyond ours, ~5 s to import; measured in eval/results/README.md): the page is one form and
two JSON calls, which needs no UI framework. The model runs one request at a time (a lock): a CPU or one GPU
gains nothing from interleaving two samplers, and the pipeline is not written for concurrent calls.
No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations (``fastapi.Request``).
"""
import base64
import io
import math
import socket
import threading
import time

from .extras import require

MAX_IMAGES = 16  # per request: the page is a demo, not a batch job
MAX_STEPS = 1000
MAX_UPLOAD_BYTES = 20 * 2 ** 20


class BadRequest(ValueError):
    """A field of a request that cannot be served: answered 400 with this one-line message."""


def _integer(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(str(value).strip())
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {value!r}") from None
    if not low <= number <= high:
        raise BadRequest(f"{name} must lie in [{low}, {high}], got {number}")
    return number


def parse_generate(body: dict, defaults: dict) -> dict:
    """A generate request's fields (strings or numbers; empty: the run's ``sample.*``) checked and typed."""
    from .sample import MAX_SEED

    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("prompt is empty: type what the image should show")
    cfg = body.get("guidance_scale")
    if cfg is None or cfg == "":
        cfg = defaults["guidance_scale"]
    try:
        cfg = float(cfg)
    except (TypeError, ValueError):
        raise BadRequest(f"guidance_scale must be a number, got {cfg!r}") from None
    if not math.isfinite(cfg) or cfg < 0:
        raise BadRequest(f"guidance_scale must be a finite number >= 0, got {cfg}")
    return {"prompt": prompt,
            "num_inference_steps": _integer(body, "num_inference_steps", defaults["num_inference_steps"], 1, MAX_STEPS),
            "guidance_scale": cfg,
            "seed": _integer(body, "seed", defaults["seed"], -MAX_SEED, MAX_SEED),
            "num_images_per_prompt": _integer(body, "num_images_per_prompt", defaults["num_images_per_prompt"],
                                              1, MAX_IMAGES)}


def png_data_url(image) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URL the page shows without another request."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Demo:
    """The model behind the page: generate and caption, one call at a time."""

    def __init__(self, pipe):
        self.pipe = pipe
        s = pipe.cfg.sample
        self.defaults = {"num_inference_steps": s.steps, "guidance_scale": s.cfg_scale, "seed": s.seed,
                         "num_images_per_prompt": s.n_per_prompt}
        self.lock = threading.Lock()

    def generate(self, body: dict) -> dict:
        args = parse_generate(body, self.defaults)
        start = time.perf_counter()
        with self.lock:
            images = self.pipe(args.pop("prompt"), **args)
        return {"images": [png_data_url(im) for im in images], "seconds": round(time.perf_counter() - start, 3),
                **args}

    def caption(self, data: bytes) -> dict:
        """A caption for one uploaded image file (any format PIL reads), center-cropped to the model's size."""
        import torch
        from PIL import Image as PILImage

        from .data.transform import ImageTransform

        if not data:
            raise BadRequest("no image uploaded: choose an image file first")
        if len(data) > MAX_UPLOAD_BYTES:
            raise BadRequest(f"the image is {len(data)} bytes; at most {MAX_UPLOAD_BYTES} are accepted")
        try:
            with PILImage.open(io.BytesIO(data)) as im:
                rgb = im.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a file that is not an image
            raise BadRequest(f"the upload is not an image that can be read ({type(e).__name__})") from None
        image = ImageTransform(self.pipe.cfg.data.resolution, crop="center", min_side=1)(rgb)
        start = time.perf_counter()
        with self.lock:
            text = self.pipe.caption(torch.stack([image]))[0]
        return {"caption": text, "seconds": round(time.perf_counter() - start, 3)}


def build_app(demo: Demo):
    """The FastAPI app: ``GET /`` the page, ``POST /api/generate`` (JSON), ``POST /api/caption`` (image bytes)."""
    fastapi = require("fastapi", "demo")
    from fastapi.responses import HTMLResponse, JSONResponse

    app = fastapi.FastAPI(title="transfusion_mot demo", docs_url=None, redoc_url=None)

    @app.exception_handler(BadRequest)
    def bad_request(request, exc: BadRequest):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.replace("{{DEFAULTS}}", _json(demo.defaults)).replace("{{SOURCE}}", _html(str(demo.pipe.source)))

    @app.post("/api/generate")
    async def generate(request: fastapi.Request):
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("the request body is not JSON") from None
        return await _in_thread(demo.generate, body)

    @app.post("/api/caption")
    async def caption(request: fastapi.Request):
        return await _in_thread(demo.caption, await request.body())

    return app


async def _in_thread(fn, arg):
    """The model call off the event loop, so the server keeps answering (the page, a second tab) meanwhile."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, arg)


def _json(value) -> str:
    import json

    return json.dumps(value)


def _html(text: str) -> str:
    import html

    return html.escape(text)


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the server starts: port 0 picks a free port, and a port in use or a
    host that is not this machine's is one clear line."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # connections queue from now on: the URL printed next already answers
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def require_server():
    """fastapi and uvicorn (the [demo] extra), or an ImportError naming the extra; returns uvicorn."""
    require("fastapi", "demo")
    return require("uvicorn", "demo")


def serve(ckpt: str, host: str = "127.0.0.1", port: int = 7860, device: str | None = None,
          dtype: str | None = None) -> None:
    """Load ``ckpt`` (a bad one stops here, before any socket), bind, print the URL, serve until Ctrl-C."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} must lie in [0, 65535] (0: any free port)")
    uvicorn = require_server()
    from .pretrained import from_pretrained

    pipe = from_pretrained(ckpt, device, dtype)
    sock = listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"demo of {pipe.source} on {pipe.device}: http://{shown}:{bound_port}/  (Ctrl-C stops)", flush=True)
    config = uvicorn.Config(build_app(Demo(pipe)), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>transfusion_mot demo</title>
<style>
 body { font-family: sans-serif; max-width: 60em; margin: 1em auto; padding: 0 1em; }
 fieldset { margin-bottom: 1em; } label { margin-right: 1em; } input[type=number] { width: 6em; }
 #prompt { width: 100%; } #images img { width: 192px; image-rendering: pixelated; margin: 4px; }
 .error { color: #b00; } .muted { color: #666; font-size: 90%; }
</style></head><body>
<h1>transfusion_mot</h1><p class="muted">model: {{SOURCE}}</p>
<fieldset><legend>Prompt &rarr; images</legend>
 <p><textarea id="prompt" rows="2" placeholder="a large green star"></textarea></p>
 <label>steps <input id="steps" type="number" min="1"></label>
 <label>CFG <input id="cfg" type="number" min="0" step="0.5"></label>
 <label>seed <input id="seed" type="number"></label>
 <label>images <input id="n" type="number" min="1" max="16"></label>
 <button id="generate">Generate</button>
 <p id="gen-status" class="muted"></p><div id="images"></div>
</fieldset>
<fieldset><legend>Image &rarr; caption</legend>
 <input id="upload" type="file" accept="image/*"> <button id="caption">Caption</button>
 <p id="cap-status" class="muted"></p><p id="caption-text"></p>
</fieldset>
<script>
const D = {{DEFAULTS}};
const $ = (id) => document.getElementById(id);
$("steps").value = D.num_inference_steps; $("cfg").value = D.guidance_scale;
$("seed").value = D.seed; $("n").value = D.num_images_per_prompt;
async function call(url, init, status) {
  status.className = "muted"; status.textContent = "working...";
  const r = await fetch(url, init); const body = await r.json();
  if (!r.ok) { status.className = "error"; status.textContent = body.error || JSON.stringify(body); return null; }
  status.textContent = body.seconds + " s"; return body;
}
$("generate").onclick = async () => {
  const req = {prompt: $("prompt").value, num_inference_steps: $("steps").value,
               guidance_scale: $("cfg").value, seed: $("seed").value, num_images_per_prompt: $("n").value};
  const body = await call("/api/generate", {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify(req)}, $("gen-status"));
  if (!body) return;
  $("images").replaceChildren(...body.images.map((src, i) => {
    const img = document.createElement("img"); img.src = src; img.alt = req.prompt + " #" + i; return img; }));
};
$("caption").onclick = async () => {
  const file = $("upload").files[0];
  const body = await call("/api/caption", {method: "POST", body: file || new Blob()}, $("cap-status"));
  if (body) $("caption-text").textContent = body.caption || "(the model wrote no text)";
};
</script></body></html>
"""
