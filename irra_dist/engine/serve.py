"""``irra-serve INDEX_DIR``: a search page and a JSON endpoint over a gallery index.

Routes (Starlette, served by uvicorn on 127.0.0.1 by default):

- ``GET /``: the page. Type a description, see the top-k grid with scores (and the identity when the index
  knows it). ``/?q=TEXT&k=N`` runs that query on load, so a search can be linked.
- ``GET /api/search?q=TEXT&k=N``: ``{"query", "top_k", "results": [{"rank", "score", "index", "name",
  "pid", "image"}]}``; a missing or empty ``q`` or a bad ``k`` is a 400 with ``{"error": "..."}``.
- ``GET /api/info``: the index's size, kind and model fingerprint.
- ``GET /image/{i}``: the image file of item ``i``.

The text tower runs in PyTorch or, with ``--runtime onnx``, in onnxruntime without torch (see
:mod:`irra_dist.retrieval.query`, whose model checks apply here too).
"""

from __future__ import annotations

import argparse
import html
import io
import json
import logging
import sys
import threading
from collections.abc import Sequence

from PIL import Image

from irra_dist.engine.search_cli import add_text_tower_args
from irra_dist.retrieval.errors import SearchError
from irra_dist.retrieval.index import GalleryIndex, GalleryIndexError
from irra_dist.retrieval.onnx_runtime import OnnxRuntimeError
from irra_dist.retrieval.query import TextEncoder, open_text_encoder, query_index
from irra_dist.tokenizer import TokenizerError

EXIT_BAD_INPUT = 2
MAX_TOP_K = 100

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>irra_dist search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: sans-serif; margin: 24px; color: #222; background: #fafafa; }
 h1 { font-size: 20px; margin: 0 0 4px; } .sub { color: #666; font-size: 13px; margin-bottom: 16px; }
 form { display: flex; gap: 8px; margin-bottom: 16px; }
 #q { flex: 1; font-size: 16px; padding: 8px; } select, button { font-size: 16px; padding: 8px 14px; }
 #status { color: #666; font-size: 13px; min-height: 18px; margin-bottom: 8px; }
 #status.error { color: #c0392b; }
 #results { display: flex; flex-wrap: wrap; gap: 12px; }
 .hit { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 6px; width: 112px;
        text-align: center; font-size: 12px; }
 .hit img { width: 96px; height: 256px; object-fit: contain; background: #eee; display: block;
            margin: 0 auto 4px; }
 .score { font-weight: bold; } .pid { color: #2c6fbb; }
 .name { color: #777; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
</style></head>
<body>
<h1>Text-to-image person search</h1>
<div class="sub">__INFO__</div>
<form id="form"><input id="q" name="q" placeholder="a woman in a red coat with a black backpack" autofocus>
<select id="k" name="k"><option>5</option><option selected>10</option><option>20</option><option>50</option>
</select><button type="submit">Search</button></form>
<div id="status"></div><div id="results"></div>
<script>
const form = document.getElementById("form"), q = document.getElementById("q");
const k = document.getElementById("k");
const statusEl = document.getElementById("status"), results = document.getElementById("results");
function cell(hit) {
  const div = document.createElement("div");
  div.className = "hit";
  div.dataset.rank = hit.rank; div.dataset.index = hit.index; div.dataset.score = hit.score;
  div.dataset.name = hit.name; if (hit.pid !== null) div.dataset.pid = hit.pid;
  const img = document.createElement("img"); img.src = hit.image; img.alt = hit.name; div.appendChild(img);
  const line = (cls, text) => { const s = document.createElement("div"); s.className = cls;
                                s.textContent = text; div.appendChild(s); };
  line("rank", "#" + hit.rank); line("score", hit.score.toFixed(4));
  if (hit.pid !== null) line("pid", "pid " + hit.pid);
  line("name", hit.name);
  return div;
}
async function run(text, topk) {
  statusEl.className = ""; statusEl.textContent = "searching...";
  const url = "api/search?q=" + encodeURIComponent(text) + "&k=" + encodeURIComponent(topk);
  const reply = await fetch(url);
  const body = await reply.json();
  results.replaceChildren();
  document.body.dataset.done = "1";
  if (!reply.ok) { statusEl.className = "error"; statusEl.textContent = body.error; return; }
  body.results.forEach(hit => results.appendChild(cell(hit)));
  statusEl.textContent = body.results.length + " results for \\u201c" + body.query + "\\u201d";
}
form.addEventListener("submit", ev => {
  ev.preventDefault();
  history.replaceState(null, "", "?q=" + encodeURIComponent(q.value) + "&k=" + k.value);
  run(q.value, k.value);
});
const params = new URLSearchParams(location.search);
const wanted = params.get("k");
if (wanted) {  // a linked k that the menu lacks gets its own entry
  if (![...k.options].some(o => o.value === wanted)) k.add(new Option(wanted, wanted));
  k.value = wanted;
}
if (params.get("q") !== null) { q.value = params.get("q"); run(q.value, k.value); }
</script></body></html>
"""


BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
                   "BMP": "image/bmp"}


def browser_image(data: bytes) -> tuple[bytes, str]:
    """An image file as a browser shows it: as stored when browsers read its format, else re-encoded as PNG
    (shards may hold pre-resized PPM images, whatever their name says)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format in BROWSER_FORMATS:
                return data, BROWSER_FORMATS[img.format]
            out = io.BytesIO()
            img.convert("RGB").save(out, format="PNG")
            return out.getvalue(), "image/png"
    except (OSError, ValueError, SyntaxError, EOFError):
        return data, "application/octet-stream"


def create_app(index: GalleryIndex, encoder: TextEncoder, *, runtime: str = "torch"):
    """The Starlette application serving `index` with `encoder` (see the module docstring)."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    lock = threading.Lock()  # one query at a time through the text tower and the index
    images_lock = threading.Lock()
    info = {"num_images": len(index), "index": index.meta.spec.describe(), "model": index.fingerprint,
            "runtime": runtime, "has_pids": index.pids is not None}
    page = PAGE.replace("__INFO__", html.escape(f"{len(index):,} images · {info['index']} · model "
                                                f"{index.fingerprint} · {runtime} text tower"))

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def home(request) -> HTMLResponse:
        return HTMLResponse(page)

    def api_info(request) -> JSONResponse:
        return JSONResponse(info)

    def api_search(request) -> JSONResponse:
        text = request.query_params.get("q", "")
        if not text.strip():
            return error("the query is empty: describe the person, e.g. ?q=a man in a red jacket")
        try:
            top_k = int(request.query_params.get("k", "10"))
        except ValueError:
            return error("k must be a whole number")
        if not 1 <= top_k <= MAX_TOP_K:
            return error(f"k must be between 1 and {MAX_TOP_K}")
        try:
            with lock:
                (result,) = query_index(index, encoder, [text], top_k=top_k)
        except (GalleryIndexError, TokenizerError) as err:
            return error(str(err))
        hits = [{"rank": r + 1, "score": score, "index": i, "name": name,
                 "pid": None if result.pids is None else result.pids[r], "image": f"image/{i}"}
                for r, (score, i, name) in enumerate(zip(result.scores, result.indices, result.names))]
        return JSONResponse({"query": text, "top_k": top_k, "results": hits})

    def image(request) -> Response:
        i = request.path_params["i"]
        if not 0 <= i < len(index):
            return error(f"no image {i}: the index holds {len(index)}", 404)
        try:
            with images_lock:  # shard readers keep open files: one read at a time
                data = index.image_bytes(i)
        except GalleryIndexError as err:
            return error(str(err), 404)
        data, kind = browser_image(data)
        return Response(data, media_type=kind, headers={"Cache-Control": "max-age=3600"})

    return Starlette(routes=[Route("/", home), Route("/api/info", api_info), Route("/api/search", api_search),
                             Route("/image/{i:int}", image)])


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irra-serve", description="A search page and a JSON endpoint over an irra-index folder.")
    parser.add_argument("index", metavar="INDEX_DIR", help="folder written by irra-index build")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    add_text_tower_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``irra-serve``: load the index and the text tower, then serve until interrupted.

    Returns:
        0 after a clean shutdown, 2 on bad input (one ``irra-serve: error:`` line).
    """
    args = _arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    errors: tuple[type[BaseException], ...] = (GalleryIndexError, OnnxRuntimeError, SearchError, OSError)
    if args.runtime == "torch":  # these modules import torch: not for --runtime onnx
        from irra_dist.config import ConfigError
        from irra_dist.model import CheckpointError

        errors += (ConfigError, CheckpointError)
    try:
        if not 0 < args.port < 65536:
            raise GalleryIndexError(f"--port must be between 1 and 65535, got {args.port}")
        index = GalleryIndex(args.index)
        encoder = open_text_encoder(index, runtime=args.runtime, onnx_dir=args.onnx,
                                    model=args.run or args.checkpoint, weights=args.weights,
                                    device=args.device)
        app = create_app(index, encoder, runtime=args.runtime)
        import uvicorn
    except errors as err:
        print(f"irra-serve: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ImportError as err:
        print(f"irra-serve: error: {err.name} is not installed: pip install 'irra_dist[serve]'",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps({"serving": args.index, "url": f"http://{args.host}:{args.port}/",
                      "images": len(index)}), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
