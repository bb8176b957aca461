"""Images in: loading under limits, and Qwen3-VL's preprocessing, with PIL and numpy only.

Sources: a file path, a ``data:`` URI (base64), a PIL image, an HWC uint8 array, and
``http(s)`` URLs only where ``ImageOptions.allow_urls`` is on (a server flag: it lets
any client make the server fetch any URL), with a byte cap, a timeout and a redirect
limit. The declared size is checked before any pixel is decoded, so a decompression
bomb costs nothing.

Preprocessing reproduces the official Qwen3-VL-Embedding / -Reranker code:
RGBA composited onto white (every other mode converted to RGB), ``smart_resize`` with
factor 32 and round-half-even, a PIL bicubic resize, (x - 127.5) / 127.5 in fp32, and
rows of 2x16x16x3 = 1,536 values laid out in 2x2 merge-block order, a still image
repeated over the temporal patch of 2.
"""
import base64
import binascii
import io
import math
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

PATCH, MERGE, TEMPORAL = 16, 2, 2
FACTOR = PATCH * MERGE  # 32: resized sides are multiples of this
MIN_PIXELS = 4 * FACTOR * FACTOR  # 4,096
MAX_PIXELS = 1800 * FACTOR * FACTOR  # 1,843,200 (the official code; servers using preprocessor_config use 1,310,720)
MAX_ASPECT = 200


class ImageError(ValueError):
    """An image that cannot be used (undecodable, over a cap, a refused URL): a 400 over HTTP."""


@dataclass
class ImageOptions:
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS  # the resize target's cap (smart_resize)
    max_source_pixels: int = 64_000_000  # declared width x height of an input, checked before decoding
    max_bytes: int = 32 << 20  # encoded size of a file, data: URI or download
    max_images: Optional[int] = None  # per request (query and documents together); the server's default is 32
    allow_urls: bool = False
    url_timeout_s: float = 10.0
    url_max_redirects: int = 3

    def configure(self, config) -> None:
        """Take the image limits of an EngineConfig (allow_url_images, max_images, image_max_pixels)."""
        self.allow_urls, self.max_images = bool(config.allow_url_images), config.max_images  # None: no cap
        if config.image_max_pixels is not None:
            self.max_pixels = int(config.image_max_pixels)


@dataclass(eq=False)
class ImageData:
    """One resized image as uint8 patches [h/16 * w/16, 3, 16, 16] in merge-block order, and its grid.

    Kept as bytes until its batch runs (an eighth of the fp32 pixel values, which repeat each
    frame over the temporal patch); ``pixel_values`` gives the model's input, exactly."""

    patches: np.ndarray
    grid: Tuple[int, int, int]  # (t, h/16, w/16)

    @property
    def num_patches(self) -> int:
        return int(self.patches.shape[0])

    @property
    def pixel_values(self) -> np.ndarray:
        """[P, 1536] fp32: (x - 127.5) / 127.5, each row (C, T = 2, 16, 16)."""
        return pixel_values(self.patches)

    @property
    def num_tokens(self) -> int:
        """Merged tokens (``<|image_pad|>`` count) in the language model."""
        t, h, w = self.grid
        return t * (h // MERGE) * (w // MERGE)


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> Tuple[int, int]:
    """(h, w): multiples of ``factor`` near the input's size, within [min_pixels, max_pixels]."""
    if min(height, width) < 1:
        raise ImageError(f"image has an empty side ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ImageError(f"image aspect ratio {max(height, width) / min(height, width):.1f} is over {MAX_ASPECT} "
                         f"({width}x{height})")
    h = max(factor, round(height / factor) * factor)  # Python's round: half to even, as the official code
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


# --- loading -------------------------------------------------------------------------------------

def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise RuntimeError("images need Pillow: pip install 'rerank-engine[images]'") from None
    return Image


def _decode(data: bytes, opts: ImageOptions, what: str):
    Image = _pil()

    if len(data) > opts.max_bytes:
        raise ImageError(f"{what} is {len(data)} bytes, over the cap of {opts.max_bytes}")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Exception as e:
        raise ImageError(f"{what} could not be decoded as an image ({type(e).__name__}: {e})") from None
    _check_declared(img.size, opts, what)
    try:
        img.load()
    except Exception as e:
        raise ImageError(f"{what} could not be decoded as an image ({type(e).__name__}: {e})") from None
    return img


def _check_declared(size, opts: ImageOptions, what: str) -> None:
    w, h = size
    if w * h > opts.max_source_pixels:
        raise ImageError(f"{what} is {w}x{h} = {w * h} pixels, over the cap of {opts.max_source_pixels}")
    if min(w, h) < 1:
        raise ImageError(f"{what} has an empty side ({w}x{h})")


class _LimitedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, limit: int):
        self.max_redirections = limit  # urllib raises HTTPError past this many
        self.max_repeats = limit

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):  # never to ftp:, file: and the like
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL {newurl!r}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, opts: ImageOptions, what: str) -> bytes:
    if not opts.allow_urls:
        raise ImageError(f"{what}: image URLs are off on this server (start it with --allow-url-images); "
                         f"send the image as a data: URI instead")
    opener = urllib.request.build_opener(_LimitedRedirects(opts.url_max_redirects))
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "rerank-engine"}),
                         timeout=opts.url_timeout_s) as resp:
            declared = resp.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > opts.max_bytes:
                raise ImageError(f"{what}: {url} is {declared} bytes, over the cap of {opts.max_bytes}")
            # The timeout bounds each socket read; the deadline bounds the whole download (a slow drip).
            deadline, chunks, size = time.monotonic() + opts.url_timeout_s, [], 0
            while size <= opts.max_bytes:
                chunk = resp.read(min(1 << 16, opts.max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if time.monotonic() > deadline:
                    raise ImageError(f"{what}: fetching {url} took more than {opts.url_timeout_s} s")
            data = b"".join(chunks)
    except ImageError:
        raise
    except urllib.error.HTTPError as e:
        raise ImageError(f"{what}: fetching {url} failed: HTTP {e.code} {e.reason}") from None
    except Exception as e:  # timeouts, refused connections, bad hosts
        raise ImageError(f"{what}: fetching {url} failed ({type(e).__name__}: {e})") from None
    return data


def load_image(src: Any, opts: ImageOptions, what: str = "image"):
    """A PIL image from any accepted source (not yet converted or resized)."""
    Image = _pil()

    if isinstance(src, Image.Image):
        _check_declared(src.size, opts, what)
        return src
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim not in (2, 3) or (src.ndim == 3 and src.shape[2] not in (1, 3, 4)):
            raise ImageError(f"{what}: an array image must be HxW or HxWxC (C = 1, 3 or 4) uint8, got "
                             f"{src.dtype} {tuple(src.shape)}")
        _check_declared((src.shape[1], src.shape[0]), opts, what)
        return Image.fromarray(src[..., 0] if src.ndim == 3 and src.shape[2] == 1 else src)
    if isinstance(src, (bytes, bytearray)):
        return _decode(bytes(src), opts, what)
    if not isinstance(src, str):
        raise ImageError(f"{what} must be a path, a data: URI, a URL, a PIL image or an HWC uint8 array; got "
                         f"{type(src).__name__}")
    if src.startswith("data:"):
        head, sep, payload = src.partition(",")
        if not sep or ";base64" not in head:
            raise ImageError(f"{what}: a data: URI must be data:<type>;base64,<data>")
        if len(payload) * 3 // 4 > opts.max_bytes:
            raise ImageError(f"{what}: the data: URI holds about {len(payload) * 3 // 4} bytes, over the cap of "
                             f"{opts.max_bytes}")
        try:
            data = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"{what}: the data: URI is not valid base64 ({e})") from None
        return _decode(data, opts, what)
    if src.startswith(("http://", "https://")):
        return _decode(_fetch(src, opts, what), opts, what)
    path = src[len("file://"):] if src.startswith("file://") else src
    if not os.path.isfile(path):
        raise ImageError(f"{what}: no such image file {path!r}")
    size = os.path.getsize(path)
    if size > opts.max_bytes:
        raise ImageError(f"{what}: {path!r} is {size} bytes, over the cap of {opts.max_bytes}")
    with open(path, "rb") as f:
        return _decode(f.read(), opts, what)


# --- preprocessing -------------------------------------------------------------------------------

def to_rgb(img):
    """RGBA composited onto white; every other mode converted to RGB (as the official code does)."""
    from PIL import Image

    if img.mode == "RGBA":
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(img, mask=img.split()[3])
        return out
    return img.convert("RGB")


def patchify(img) -> ImageData:
    """uint8 patches [gh * gw, 3, 16, 16] in (h/32, w/32, 2, 2) order from an RGB image of sides % 32 == 0."""
    x = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    H, W, C = x.shape
    gh, gw = H // PATCH, W // PATCH
    x = x.transpose(2, 0, 1).reshape(C, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/2, gw/2, 2, 2, C, 16, 16]
    return ImageData(np.ascontiguousarray(x.reshape(gh * gw, C, PATCH, PATCH)), (1, gh, gw))


def pixel_values(patches):
    """uint8 patches [P, C, 16, 16] (numpy, or a torch tensor on any device) -> fp32 [P, C * 2 * 16 * 16]:
    (x - 127.5) / 127.5, a still image repeated over the temporal patch."""
    if isinstance(patches, np.ndarray):
        x = (patches.astype(np.float32) - 127.5) / 127.5
        x = np.broadcast_to(x[:, :, None], (x.shape[0], x.shape[1], TEMPORAL) + x.shape[2:])
        return np.ascontiguousarray(x.reshape(x.shape[0], -1))
    x = (patches.float() - 127.5) / 127.5
    return x[:, :, None].expand(-1, -1, TEMPORAL, -1, -1).reshape(x.shape[0], -1)


def preprocess(src: Any, opts: ImageOptions, what: str = "image") -> ImageData:
    """Load, convert, resize and patchify one image; errors are ImageError naming ``what``."""
    img = load_image(src, opts, what)
    try:
        rgb = to_rgb(img)
        h, w = smart_resize(rgb.height, rgb.width, FACTOR, opts.min_pixels, opts.max_pixels)
    except ImageError as e:
        raise ImageError(f"{what}: {e}") from None
    except Exception as e:
        raise ImageError(f"{what} could not be decoded as an image ({type(e).__name__}: {e})") from None
    from PIL import Image

    return patchify(rgb.resize((w, h), Image.BICUBIC))
