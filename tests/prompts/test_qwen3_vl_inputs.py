"""Qwen3-VL inputs: every accepted image source and input shape, URL fetching under limits, bad images."""
import base64
import io
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from engine import Reranker
from engine.prompts.images import ImageError, ImageOptions, preprocess
from tiny_qwen3_vl import sample_images, tiny_qwen3_vl


@pytest.fixture(scope="module")
def reranker(tmp_path_factory, qwen3_backend):
    return Reranker(str(tiny_qwen3_vl(tmp_path_factory, qwen3_backend, "Qwen3-VL-Reranker-tiny")), device="cpu")


@pytest.fixture(scope="module")
def png():
    img = sample_images()["100x70"]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return img, buf.getvalue()


def data_uri(data: bytes, kind="image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


@pytest.fixture
def options(reranker):
    """The reranker's image options, restored after the test."""
    opts = reranker.engine.template.image_options
    saved = replace(opts)
    yield opts
    reranker.engine.template.image_options = opts
    for k, v in vars(saved).items():
        setattr(opts, k, v)


def test_every_image_source_and_input_shape_scores_alike(reranker, png, tmp_path):
    img, data = png
    path = tmp_path / "page.png"
    path.write_bytes(data)
    uri = data_uri(data)
    docs = [
        {"text": "caption", "image": img},
        {"text": "caption", "image": str(path)},
        {"text": "caption", "image": "file://" + str(path)},
        {"text": "caption", "image": uri},
        {"text": "caption", "image": np.asarray(img)},  # HWC uint8
        [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "caption"}],  # SGLang
        {"content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "caption"}]},  # vLLM
        [{"type": "text", "text": "cap"}, {"type": "image", "image": img}, {"type": "text", "text": "tion"}],
    ]
    scores = reranker.predict([("the query", d) for d in docs])
    np.testing.assert_allclose(scores, scores[0], atol=1e-6, rtol=0)
    text_only = reranker.predict([("the query", "caption"), ("the query", [{"type": "text", "text": "caption"}])])
    assert text_only[0] == text_only[1] and abs(text_only[0] - scores[0]) > 1e-4  # the image matters


def test_bad_images_are_value_errors_naming_the_document(reranker, png, options):
    img, data = png
    good = {"image": img}
    cases = [
        ({"image": data_uri(b"not an image at all")}, r"documents\[1\] image 0 could not be decoded"),
        ({"image": "data:image/png;base64,@@@"}, r"documents\[1\]"),
        ({"image": np.zeros((2, 600, 3), dtype=np.uint8)}, r"documents\[1\].*aspect ratio 300"),
        ({"image": "http://127.0.0.1:9/page.png"}, r"documents\[1\].*URLs are off.*--allow-url-images"),
        ({"image": "/no/such/file.png"}, r"documents\[1\].*no such image file"),
        ({"image": np.zeros((4, 4), dtype=np.float32)}, r"documents\[1\].*uint8"),
        ([{"type": "audio", "audio": "x"}], r"documents\[1\] part 0"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            reranker.rank("q", [good, bad])
    options.max_images = 2
    with pytest.raises(ValueError, match=r"documents\[1\]: the request holds more than 2 images"):
        reranker.rank({"text": "q", "image": img}, [good, good])
    options.max_images = None  # the Python default: no cap (the server's --max-images is 32)
    assert len(reranker.rank("q", [good] * 40)) == 40
    options.max_bytes = 1000
    with pytest.raises(ValueError, match=r"documents\[0\].*bytes, over the cap of 1000"):
        reranker.rank("q", [{"image": data_uri(data)}])
    options.max_bytes = 32 << 20
    assert len(reranker.rank("q", [good, "text"])) == 2  # the engine serves on


def test_decompression_bomb_is_refused_before_decoding(png):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, format="PNG")  # a few kB declaring 36 M pixels
    bomb = buf.getvalue()
    assert len(bomb) < 100_000
    opts = ImageOptions(max_source_pixels=10_000_000)
    decoded = []
    original = Image.Image.load
    Image.Image.load = lambda self: decoded.append(1) or original(self)
    try:
        with pytest.raises(ImageError, match="6000x6000 = 36000000 pixels, over the cap"):
            preprocess(bomb, opts, "documents[0] image 0")
    finally:
        Image.Image.load = original
    assert decoded == []  # the header alone was read


class _Handler(BaseHTTPRequestHandler):
    png = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/page.png":
            self._send(200, self.png)
        elif self.path.startswith("/hop/"):
            n = int(self.path.rsplit("/", 1)[1])
            self.send_response(302)
            self.send_header("Location", "/page.png" if n == 0 else f"/hop/{n - 1}")
            self.end_headers()
        elif self.path == "/ftp.png":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/page.png")
            self.end_headers()
        elif self.path == "/slow.png":
            time.sleep(1.5)
            self._send(200, self.png)
        elif self.path == "/drip.png":  # every read is quick, the whole is slow
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            step = len(self.png) // 10 + 1
            try:
                for i in range(0, len(self.png), step):
                    self.wfile.write(self.png[i:i + step])
                    time.sleep(0.15)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif self.path == "/big.png":
            self._send(200, self.png + b"\0" * 5000)
        else:
            self._send(404, b"missing")

    def _send(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def image_server(png):
    _Handler.png = png[1]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_images_only_when_allowed_with_caps(reranker, png, options, image_server):
    img, data = png
    url = image_server + "/page.png"
    with pytest.raises(ValueError, match="URLs are off"):
        reranker.predict([("q", {"image": url})])
    options.allow_urls, options.url_timeout_s, options.url_max_redirects = True, 0.5, 2
    options.max_bytes = len(data) + 100
    want = reranker.predict([("q", {"image": img})])[0]
    assert abs(reranker.predict([("q", {"image": url})])[0] - want) <= 1e-6
    assert abs(reranker.predict([("q", {"image": image_server + "/hop/1"})])[0] - want) <= 1e-6
    for path, message in (("/hop/5", "HTTP 302"), ("/slow.png", "timed out"), ("/big.png", "over the cap"),
                          ("/nothing.png", "HTTP 404"), ("/ftp.png", "non-http"), ("/drip.png", "took more than")):
        with pytest.raises(ValueError, match=rf"pairs\[0\] document image 0: .*{message}"):
            reranker.predict([("q", {"image": image_server + path})])
