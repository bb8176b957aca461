"""``EngineConfig``: every option of an engine, with its default, its check and its help.

One definition per option. ``Reranker``, ``Embedder``, ``Classifier``, the engine, the
service, the CLI (its flags are built from these fields) and the Ray replicas all take
this object; adding an option is adding a field here. Request options (``top_n``,
``instruction``, ``dimensions``, ...) are not engine options: they travel with each call.

Imports nothing heavy (no torch): ``rerank-engine --help`` builds its flags from it.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

TASKS = ("rerank", "embed")
DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
QUANTIZE_MODES = ("int8",)


def _opt(default, help: str, *, flag: Optional[str] = None, kind: Any = None, choices=None, metavar=None,
         commands: str = "all", command_defaults: Optional[Dict[str, Any]] = None):
    """A field with its CLI description.

    ``flag``: the CLI flag (default ``--<name with dashes>``; "" for none); ``kind``: how the flag's
    text becomes the value (int, "bool" for a switch, "bool?" for --x/--no-x, "csv" for a list);
    ``commands``: "all" (every engine command) or "serve"; ``command_defaults``: a command whose flag
    has another default than the Python API (the server caps images per request, Python does not).
    """
    return field(default=default, metadata={"help": help, "flag": flag, "kind": kind, "choices": choices,
                                            "metavar": metavar, "commands": commands,
                                            "command_defaults": command_defaults or {}})


@dataclass(frozen=True)
class EngineConfig:
    """What an engine loads and how it runs. Every field has a default; ``None`` means "decide from
    the model and the device" where the help says so."""

    # -- the model --------------------------------------------------------------------------------
    model: Optional[str] = _opt(None, "a local model folder or a hub id (default: the bundled all-MiniLM-L6-v2)",
                                flag="")  # the CLI's positional MODEL (serve) or --model
    task: Optional[str] = _opt(None, "rerank or embed (default: what the model's name says, Reranker / Embedding)",
                               choices=TASKS)
    # -- device and numerics ------------------------------------------------------------------------
    device: Optional[str] = _opt(None, "cuda, cuda:1, cpu (default: cuda when available)")
    dtype: Any = _opt(None, "float32, float16 or bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    quantize: Optional[str] = _opt(None, "CPU only: int8 linear layers, activations per token (opt-in; see "
                                         "bench/RESULTS.md for speed and drift)", choices=QUANTIZE_MODES)
    compile: bool = _opt(False, "run the scoring forward through torch.compile (slower start; see bench/RESULTS.md)",
                         kind="bool")
    # -- batching and caches ------------------------------------------------------------------------
    max_length: Optional[int] = _opt(None, "tokens per sequence; longer inputs are truncated (default: the model's "
                                           "template, 8192)", kind=int)
    max_batch_tokens: Optional[int] = _opt(None, "token budget of one packed batch (default: 4096 on CPU, 16384 on "
                                                 "GPU)", kind=int)
    share_prefix: bool = _opt(True, "LLM rerankers: compute each query's prompt head once and let its documents "
                                    "attend to it (--no-share-prefix scores every pair whole, for A/B checks)",
                              kind="bool?")
    prefix_cache_bytes: int = _opt(256 << 20, "bytes of shared-prefix K/V kept between requests", kind=int)
    passage_cache_bytes: Optional[int] = _opt(None, "KaLM-Reranker: bytes of the paged passage cache (default: "
                                                    "1 GiB on CUDA, 256 MiB on CPU)", kind=int)
    cache_cross_kv: bool = _opt(False, "KaLM-Reranker: cache every decoder layer's cross K/V instead of the pooled "
                                       "encoder states (more memory, less work per batch)", kind="bool")
    passage_store: Optional[str] = _opt(None, "KaLM-Reranker: a passage store folder built by `rerank-engine index`; "
                                              "documents given as {\"id\": ...} are scored from it with no "
                                              "encoder work", metavar="DIR", commands="serve")
    decode_cache_bytes: int = _opt(2 << 30, "bytes of the KV cache of the running decode batch (evidence)",
                                   kind=int)
    # -- prompts ------------------------------------------------------------------------------------
    template: Optional[str] = _opt(None, "prompt of a yes/no or 2-way reranker: qwen3, prism, querit, a Jinja "
                                         "template file (rendered with query, document, instruction) or a format "
                                         "string with {query}, {document} and {instruction} (default: the model's "
                                         "own; Prism's for models named *prism*)")
    template_prefix: str = _opt("", "literal text before a format-string --template")
    template_suffix: str = _opt("", "literal text after a format-string --template")
    label_tokens: Optional[Tuple[str, ...]] = _opt(None, "the yes/no answers of a yes/no reranker, comma-separated "
                                                         "(default: yes,no)", kind="csv")
    calibration: Optional[str] = _opt(None, "rerankers: a calibration file (rerank-engine calibrate) making scores "
                                            "calibrated probabilities; min_score and evidence_threshold apply to "
                                            "them, raw_scores stays the exact logit", metavar="FILE")
    # -- images (Qwen3-VL) --------------------------------------------------------------------------
    allow_url_images: bool = _opt(False, "fetch http(s) image URLs (off: any client could make the server fetch any "
                                         "URL); with a 32 MiB cap, a 10 s timeout and 3 redirects at most",
                                  kind="bool", commands="serve")
    max_images: Optional[int] = _opt(None, "images per request; more get 400 (default: no cap in Python and "
                                           "offline, 32 in the server)", kind=int, commands="serve",
                                     command_defaults={"serve": 32})
    image_max_pixels: Optional[int] = _opt(None, "resize cap of an image (default 1,843,200 as the official "
                                                 "Qwen3-VL code; servers reading preprocessor_config.json use "
                                                 "1,310,720)", kind=int, commands="serve")

    def __post_init__(self):
        if self.model is not None and not isinstance(self.model, str):
            object.__setattr__(self, "model", str(self.model))  # a pathlib.Path
        if self.passage_store is not None and not isinstance(self.passage_store, str):
            object.__setattr__(self, "passage_store", str(self.passage_store))
        if self.label_tokens is not None:
            if isinstance(self.label_tokens, str):
                raise TypeError("label_tokens must be a sequence of strings such as ('yes', 'no'), not a string")
            object.__setattr__(self, "label_tokens", tuple(self.label_tokens))
            if not self.label_tokens or not all(isinstance(t, str) and t for t in self.label_tokens):
                raise ValueError(f"label_tokens must be non-empty strings, got {self.label_tokens!r}")
        _choice("task", self.task, TASKS)
        _choice("quantize", self.quantize, QUANTIZE_MODES)
        if isinstance(self.dtype, str):
            _choice("dtype", self.dtype, DTYPES)
        for name in ("max_length", "max_batch_tokens", "passage_cache_bytes", "max_images", "image_max_pixels"):
            _positive(name, getattr(self, name), optional=True)
        for name in ("prefix_cache_bytes", "decode_cache_bytes"):
            _positive(name, getattr(self, name), optional=False)
        for name in ("compile", "share_prefix", "cache_cross_kv", "allow_url_images"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.calibration is not None and not isinstance(self.calibration, str):
            object.__setattr__(self, "calibration", str(self.calibration))  # a pathlib.Path
        for name in ("template_prefix", "template_suffix"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        if (self.template_prefix or self.template_suffix) and self.template is None:
            raise ValueError("template_prefix/template_suffix go with a format-string template")

    @classmethod
    def build(cls, config: Optional["EngineConfig"] = None, **options) -> "EngineConfig":
        """``config`` (or the defaults) with the options given; an option left at None keeps the
        config's value. This is how the keyword arguments of ``Reranker`` and ``Embedder`` map here."""
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; EngineConfig has {', '.join(sorted(names))}")
        given = {k: v for k, v in options.items() if v is not None}
        return dataclasses.replace(config, **given) if config is not None else cls(**given)

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    def summary(self) -> str:
        """``name=value`` of every field, for the start-up log."""
        return " ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))


def _choice(name: str, value, choices) -> None:
    if value is not None and value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _positive(name: str, value, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def cli_fields(command: str):
    """``(field, flag, metadata)`` of every option the CLI command ``command`` takes as a flag."""
    out = []
    for f in dataclasses.fields(EngineConfig):
        meta = f.metadata
        if meta["flag"] == "" or (meta["commands"] != "all" and meta["commands"] != command):
            continue
        out.append((f, meta["flag"] or "--" + f.name.replace("_", "-"), meta))
    return out
