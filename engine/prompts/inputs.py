"""Input shapes: what a caller may give where a string went before, and its text part.

An input is:
  - a string (text);
  - a dict ``{"text": str | [str], "image": source | [source]}``;
  - a list of parts ``[{"type": "text", "text": ...}, {"type": "image_url", "image_url": {"url": ...}}]``
    (also ``{"type": "image", "image": source}``, bare strings as text parts);
  - vLLM's ``{"content": [parts]}``.
An image source is anything engine.prompts.images.load_image takes. ``normalize_inputs`` turns
inputs into plain strings (text only) or ``Content`` (texts and preprocessed images),
loading every image up front so that a bad one fails its request with a message naming
the input, before any model work. ``text_part`` is the one place that reads the text of
any input shape (the server's token counts, truncation, the CLI's output).
"""
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union

from engine.prompts.images import ImageData, ImageError, ImageOptions, preprocess

VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"


@dataclass(eq=False)
class Content:
    """One input holding images: its texts and its preprocessed images, in the order given."""

    texts: List[str] = field(default_factory=list)
    images: List[ImageData] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.texts)


Input = Union[str, Content]


def _is_image(x) -> bool:
    import numpy as np

    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency of the images extra
        return isinstance(x, np.ndarray)
    return isinstance(x, (Image.Image, np.ndarray, bytes, bytearray))


def _parts(parts: Sequence, what: str) -> Tuple[List[str], List[Any]]:
    texts, images = [], []
    for k, p in enumerate(parts):
        where = f"{what} part {k}"
        if isinstance(p, str):
            texts.append(p)
        elif _is_image(p):
            images.append(p)
        elif isinstance(p, dict):
            kind = p.get("type")
            if kind == "text" and isinstance(p.get("text"), str):
                texts.append(p["text"])
            elif kind == "image_url":
                url = p.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ValueError(f"{where}: an image_url part needs image_url.url (a string)")
                images.append(url)
            elif kind == "image" and p.get("image") is not None:
                images.append(p["image"])
            else:
                raise ValueError(f"{where}: a part must be {{type: text, text}} or {{type: image_url, image_url: "
                                 f"{{url}}}}, got type {kind!r}")
        else:
            raise ValueError(f"{where}: a part must be a string or a dict, got {type(p).__name__}")
    return texts, images


def split_input(x: Any, what: str) -> Tuple[List[str], List[Any]]:
    """(texts, image sources) of any accepted input shape."""
    if isinstance(x, str):
        return [x], []
    if isinstance(x, Content):
        return list(x.texts), list(x.images)
    if isinstance(x, dict):
        if "content" in x:
            content = x["content"]
            return split_input(content, what) if isinstance(content, (str, list)) else _parts([content], what)
        if "type" in x:
            return _parts([x], what)
        if "text" not in x and "image" not in x:
            raise ValueError(f"{what}: a dict input needs 'text' and/or 'image' (or 'content': [parts])")
        text, image = x.get("text"), x.get("image")
        texts = [] if text is None else [text] if isinstance(text, str) else list(text)
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"{what}: 'text' must be a string or a list of strings")
        return texts, images
    if isinstance(x, (list, tuple)):
        return _parts(x, what)
    if _is_image(x):
        return [], [x]
    raise ValueError(f"{what} must be a string, a dict {{text, image}} or a list of parts; got {type(x).__name__}")


def normalize_input(x: Any, what: str, opts: ImageOptions, counted: Optional[list] = None) -> Input:
    """One input as a string (text only) or a Content with its images loaded and preprocessed.

    ``counted``: a one-element list holding the images of the request so far (query and
    documents share ``opts.max_images``)."""
    if isinstance(x, str):
        return x
    texts, sources = split_input(x, what)
    if not sources:
        return "".join(texts)
    counted = counted if counted is not None else [0]
    counted[0] += len(sources)
    if opts.max_images is not None and counted[0] > opts.max_images:
        raise ImageError(f"{what}: the request holds more than {opts.max_images} images (--max-images)")
    images = [s if isinstance(s, ImageData) else preprocess(s, opts, f"{what} image {k}")
              for k, s in enumerate(sources)]
    return Content(texts, images)


def normalize_inputs(items: Sequence[Any], what: str, opts: ImageOptions,
                     counted: Optional[list] = None) -> List[Input]:
    """``normalize_input`` of each item, named ``what[i]`` in errors."""
    counted = counted if counted is not None else [0]
    return [normalize_input(x, f"{what}[{i}]", opts, counted) for i, x in enumerate(items)]


def text_part(x: Any) -> str:
    """The text of any input shape, images left out: the one reader of an input's text (token
    counts and truncation in the server, the documents echoed by responses and the CLI). It reads
    inputs that were validated already; a shape ``split_input`` refuses has no text."""
    if isinstance(x, str):
        return x
    try:
        texts, _ = split_input(x, "input")
    except ValueError:
        return ""
    return "".join(texts)
