"""The engine loop: one thread owns the model, the device and every cache.

``Engine`` resolves a model (folder or hub id), loads its tokenizer, template,
runner and caches, and starts one thread that repeats:
    step = scheduler.schedule()      # what to run next (never runs anything)
    out = runner.run(step)           # step.kind.run: plan, forward, head (never schedules)
    scheduler.postprocess(step, out) # results back to the requests
(engine/core/loop.py: on CUDA a scoring step's results come back through an event while
the next step is planned and launched).
Callers on any thread build requests (engine.core.request), ``submit`` them and wait.
Every model call (scoring and embedding batches, shared prefixes, KaLM passage
encoding and decoding, evidence prefill and decode) is a step of this loop.
"""
import atexit
import logging
import os
import queue
import threading
import weakref
from types import SimpleNamespace
from typing import Optional

import kernels
from engine.config import EngineConfig
from engine.core import decode, passages
from engine.core.cache import PrefixCache
from engine.core.loop import Loop
from engine.core.request import Request
from engine.core.runner import ModelRunner, pick_device, pick_dtype
from engine.core.scheduler import Scheduler
from engine.core.steps import default_kinds
from engine.default_model import default_model_path
from engine.models import registry
from engine.prompts.calibration import calibration_seqs
from engine.prompts.registry import template_class
from engine.prompts.tokenizer import load_tokenizer
from engine.prompts.user_template import PromptTemplate, user_template
from engine.weights import checkpoint_index, read_config, resolve_model

log = logging.getLogger("engine")

# Loop threads end before the interpreter finalizes: a daemon thread still freeing a model (C++
# frames on its stack) when finalization stops it would abort the process.
_STOPPING = threading.Event()
_LOOPS: "weakref.WeakSet" = weakref.WeakSet()  # the live loop threads
_SCHEDULERS: "weakref.WeakSet" = weakref.WeakSet()


@atexit.register
def _stop_loops() -> None:
    _STOPPING.set()
    for scheduler in list(_SCHEDULERS):
        scheduler.wake()
    for thread in list(_LOOPS):
        thread.join(timeout=5)


class Engine:
    """One loaded model and its loop thread, configured by an ``EngineConfig``.

    ``task_default``: the task when neither the config nor the model's name says (a Reranker
    asks for "rerank", an Embedder for "embed")."""

    def __init__(self, config: EngineConfig, task_default: Optional[str] = None):
        if not isinstance(config, EngineConfig):
            raise TypeError(f"Engine takes an EngineConfig, got {type(config).__name__}")
        self.config = config
        model = config.model if config.model is not None else str(default_model_path())  # all-MiniLM-L6-v2
        self.folder = resolve_model(model)
        self.config_dict = read_config(self.folder)
        self.arch, spec = registry.lookup(self.config_dict, set(checkpoint_index(self.folder)))
        name = f"{model} {self.folder.name}"  # what the task and template are inferred from
        self.task = registry.infer_task(spec, name, config.task, task_default)
        self.device = pick_device(config.device)
        if self.device.type == "cpu":
            # On CPU the model wants every core; the tokenizer's own thread pool would spin against it.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.dtype = pick_dtype(config.dtype, self.device)
        # CPU ops run the C++ kernels (csrc/): build or load them now, not in the first request.
        self.cpu_kernels = "none"
        if self.device.type == "cpu":
            mode = kernels.kernel_mode()  # "torch" or "triton" force a path; "auto" prefers the C++ kernels
            self.cpu_kernels = mode if mode != "auto" else ("csrc" if kernels.csrc_available() else "torch")
        self.tokenizer = load_tokenizer(self.folder)
        template = config.template
        template_cls = template_class(spec, self.task, template, name)
        extra: dict = {}
        if template_cls is PromptTemplate:  # a user's Jinja file or format string
            extra = user_template(template, config.template_prefix, config.template_suffix, spec.tasks[self.task].head)
        elif config.template_prefix or config.template_suffix:
            raise ValueError("template_prefix/template_suffix go with a format-string template")
        # Encoder templates read sentence-transformers files and the position limit.
        if template_cls.needs_model_files:
            positions = registry.model_class(spec).max_input_length(SimpleNamespace(**self.config_dict))
            extra.update(folder=self.folder, config=self.config_dict, max_positions=positions)
        self.max_length = config.max_length if config.max_length is not None else template_cls.default_max_length
        self.template = template_cls(self.tokenizer, max_length=self.max_length, **extra)
        if self.template.multimodal:  # Qwen3-VL: the image limits of the config
            self.template.image_options.configure(config)
        # CPU: 4096, the best budget bench/e2e_rerank.py found (bench/RESULTS.md); GPU: 16k, not yet measured.
        self.max_batch_tokens = config.max_batch_tokens or (16384 if self.device.type == "cuda" else 4096)
        # The model is built and loaded on the loop thread that will run it (see _start).
        calibration = (lambda: calibration_seqs(self.template, self.task)) if config.quantize else None
        self._start(lambda: ModelRunner(self.folder, self.config_dict, spec, self.task, self.device, self.dtype,
                                        self.tokenizer, label_tokens=config.label_tokens, compile=config.compile,
                                        quantize=config.quantize, calibration=calibration))
        try:
            model_ = self.runner.model
            self.prefix_cache = PrefixCache(config.prefix_cache_bytes)
            self.passage_cache = None
            self.model_id = f"{self.folder.resolve()}|{self.dtype}" + (f"|{config.quantize}" if config.quantize else "")
            if model_.is_encoder_decoder:
                # Default budgets: 1 GiB on CUDA, 256 MiB on CPU.
                budget = config.passage_cache_bytes
                if budget is None:
                    budget = (1 << 30) if self.device.type == "cuda" else (256 << 20)
                self.passage_cache = self._on_thread(lambda: passages.passage_pool(
                    model_, budget, config.cache_cross_kv, self.dtype, self.device,
                    self.template.document_max_length))
                self.runner.passage_cache, self.runner.cache_kv = self.passage_cache, config.cache_cross_kv
                self.model_id += "|kv" if config.cache_cross_kv else "|states"
            self.passage_store = None
            if config.passage_store is not None:
                if not model_.is_encoder_decoder:
                    raise ValueError(f"passage_store needs an encoder-decoder reranker (KaLM-Reranker); "
                                     f"{self.arch} is not one")
                from engine.core.store import PassageStore, engine_identity

                self.passage_store = PassageStore(config.passage_store, identity=engine_identity(self))
            kv_bytes = decode.kv_bytes(model_) if model_.supports_decode else (0, 0)
            self.scheduler = Scheduler(self.max_batch_tokens, self.prefix_cache,
                                       default_kinds(config.decode_cache_bytes, kv_bytes), self.passage_cache)
        except BaseException:
            self._jobs.put(False)  # never made: the thread ends and lets go of the model
            raise
        self._jobs.put(None)  # set up: the thread enters the loop
        log.info("loaded %s (%s, task %s) on %s in %s", self.folder.name, self.arch, self.task, self.device,
                 str(self.dtype).replace("torch.", ""))
        log.info("engine config: %s", config.summary())

    @property
    def model(self):
        return self.runner.model

    @property
    def head(self):
        return self.runner.head

    def _start(self, build) -> None:
        """Start the loop thread; it runs ``build()`` (the runner) and then the set-up jobs of
        ``_on_thread`` until handed None, then the loop.

        Every parallel torch op of the engine, loading included, runs on this one thread. On CPU
        each thread that runs parallel ops gets its own OpenMP team, and once a process has more
        OpenMP threads than cores libgomp stops spinning between parallel regions and sleeps:
        a one-text forward then takes markedly longer (figures in bench/RESULTS.md).
        """
        self._jobs: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=Engine._main, args=(weakref.ref(self), self._jobs, self.device),
                                        name="engine", daemon=True)
        self._thread.start()
        _LOOPS.add(self._thread)
        try:
            self.runner = self._on_thread(build)
        except BaseException:
            self._jobs.put(False)  # the engine was never made: the thread ends
            raise

    def _on_thread(self, fn):
        """Run ``fn`` on the loop thread before the loop starts; its result or its exception."""
        box: dict = {}
        done = threading.Event()
        self._jobs.put((fn, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    @staticmethod
    def _main(ref, jobs, device) -> None:
        """The loop thread. It holds the engine only through the weak reference ``ref``: once its
        users drop the engine, the loop ends within a scheduling timeout and frees the model.
        On CUDA it first makes ``device`` its own (current device, Triton's TMA allocator there)."""
        try:
            kernels.bind_device(device)
        except BaseException as e:  # every set-up job then reports it
            while (job := jobs.get()) not in (None, False):
                job[1]["error"] = e
                job[2].set()
            return
        while True:
            job = jobs.get()
            if job is None:
                break
            if job is False:
                return
            fn, box, done = job
            try:
                box["value"] = fn()
            except BaseException as e:
                box["error"] = e
            finally:
                done.set()
            del job, fn, box, done  # the set-up closures refer to the engine
        engine = ref()
        if engine is None:
            return
        scheduler, runner = engine.scheduler, engine.runner
        del engine
        _SCHEDULERS.add(scheduler)
        loop = Loop(scheduler, runner)
        while ref() is not None and not _STOPPING.is_set():
            loop.turn(timeout=1.0)
        loop.drain()

    def submit(self, req: Request) -> Request:
        """Queue a request on the engine loop; wait on the returned request."""
        if req.done.is_set():
            return req
        self.scheduler.add(req)
        return req
