"""EngineConfig is the one place of every engine option: the CLI's flags are its fields (and back),
their defaults agree, its checks name the option, and config= scores as the keyword arguments do."""
import argparse
import dataclasses

import numpy as np
import pytest

from engine import EngineConfig
from engine.cli import _parser
from engine.config import cli_fields

# Flags that are not engine options: the request options of each command (what one call asks
# for), and the options of the process around the engine (logging, the HTTP server, Ray, files).
REQUEST_OPTIONS = {
    "rank": {"query", "documents", "top_n", "instruction", "raw_scores", "chunk_tokens", "chunk_overlap",
             "chunk_aggregate"},
    "calibrate": {"pairs", "output", "method", "holdout"},
    "embed": {"input", "output", "dimensions", "instruction"},
    "classify": {"labels", "input", "multi_label", "threshold", "instruction"},
    "batch": {"input", "output", "errors"},
    "index": {"input", "store", "compression_ratio", "errors", "verify"},
    "serve": set(),
}
PROCESS_OPTIONS = {
    "all": {"help", "model", "quiet", "debug"},
    "serve": {"host", "port", "api_key", "api_key_file", "served_model_name", "max_queue", "max_documents",
              "max_pairs", "max_body_mb", "body_timeout", "graceful_timeout", "log_level", "replicas",
              "max_replicas", "target_queue", "replica_cpus", "ray_address", "max_response_mb",
              "max_pending_body_mb", "max_header_kb", "header_timeout", "allowed_hosts", "strict"},
    "batch": {"ray_address", "concurrency", "batch_size", "num_cpus", "num_gpus"},
    "index": {"ray_address", "concurrency"},
}
FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def commands():
    """(command name as cli_fields knows it, its argparse parser), batch's two tasks included."""
    out = []
    for name, p in _subparsers(_parser()).items():
        if name == "batch":
            out += [("batch", sub) for sub in _subparsers(p).values()]
        else:
            out.append((name, p))
    return out


@pytest.mark.parametrize("command,parser", commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_flag_is_an_engine_option_or_a_request_option(command, parser):
    allowed = REQUEST_OPTIONS[command] | PROCESS_OPTIONS["all"] | PROCESS_OPTIONS.get(command, set())
    engine_flags = {f.name for f, _, _ in cli_fields(command)}
    for action in parser._actions:
        dest = action.dest
        if dest in engine_flags:
            assert dest in FIELDS
            continue
        assert dest in allowed, f"rerank-engine {command}: {action.option_strings or dest} is neither an " \
                                f"EngineConfig field nor a declared request/process option"
        assert dest not in FIELDS or dest == "model", f"{dest} is an EngineConfig field but not built from it"


@pytest.mark.parametrize("command,parser", commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_engine_option_is_a_flag_with_the_same_default(command, parser):
    by_dest = {a.dest: a for a in parser._actions}
    for name, f in FIELDS.items():
        meta = f.metadata
        if meta["flag"] == "":
            assert name == "model" and "model" in by_dest  # the positional MODEL / --model
            continue
        if meta["commands"] not in ("all", command):
            assert name not in by_dest
            continue
        assert name in by_dest, f"EngineConfig.{name} has no flag on rerank-engine {command}"
        want = meta["command_defaults"].get(command, f.default)
        assert by_dest[name].default == want, (command, name)
        assert by_dest[name].help == meta["help"]


def test_flags_parse_into_the_config():
    from engine.cli import _config

    args = _parser().parse_args(["rank", "--query", "q", "--documents", "d.jsonl", "--max-length", "96",
                                 "--no-share-prefix", "--label-tokens", "true,false", "--task", "rerank",
                                 "--prefix-cache-bytes", "1024"])
    cfg = _config(args)
    assert cfg == EngineConfig(max_length=96, share_prefix=False, label_tokens=("true", "false"), task="rerank",
                               prefix_cache_bytes=1024)
    serve = _config(_parser().parse_args(["serve", "some/model"]))
    assert serve.model == "some/model" and serve.max_images == 32  # the server caps images per request
    assert EngineConfig().max_images is None  # Python does not


@pytest.mark.parametrize("options,message", [
    ({"task": "classify"}, "task must be one of rerank, embed"),
    ({"max_length": 0}, "max_length must be a positive integer"),
    ({"max_batch_tokens": -5}, "max_batch_tokens must be a positive integer"),
    ({"quantize": "int4"}, "quantize must be one of int8"),
    ({"dtype": "float8"}, "dtype must be one of"),
    ({"share_prefix": "yes"}, "share_prefix must be True or False"),
    ({"label_tokens": "yes"}, "label_tokens must be a sequence of strings"),
    ({"label_tokens": ("yes", "")}, "label_tokens must be non-empty strings"),
    ({"template_prefix": "x"}, "template_prefix/template_suffix go with a format-string template"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        EngineConfig(**options)


def test_build_keeps_the_config_where_an_option_is_not_given():
    base = EngineConfig(device="cpu", max_length=64, share_prefix=False)
    assert EngineConfig.build(base) is not None and EngineConfig.build(base) == base
    assert EngineConfig.build(base, max_length=None, dtype="bfloat16") == base.replace(dtype="bfloat16")
    with pytest.raises(TypeError, match="unknown engine option\\(s\\) max_lenght"):
        EngineConfig.build(base, max_lenght=12)
    with pytest.raises(TypeError, match="config must be an EngineConfig"):
        EngineConfig.build({"device": "cpu"})


def test_config_and_keyword_arguments_score_the_same(make_qwen3, caplog):
    from engine import Reranker

    folder = str(make_qwen3())
    pairs = [("what is the capital of china?", "Beijing is the capital of China."),
             ("what is the capital of china?", "Gravity attracts bodies."), ("q", "a short document")]
    with caplog.at_level("INFO", logger="engine"):
        by_kw = Reranker(folder, device="cpu", max_length=96, max_batch_tokens=128, share_prefix=False)
    cfg = EngineConfig(model=folder, device="cpu", max_length=96, max_batch_tokens=128, share_prefix=False)
    by_cfg = Reranker(config=cfg)
    assert by_cfg.config == by_kw.config == cfg
    np.testing.assert_array_equal(by_kw.predict(pairs), by_cfg.predict(pairs))
    # A keyword argument overrides the config it comes with.
    over = Reranker(config=cfg, share_prefix=True)
    assert over.config.share_prefix and over.engine.max_length == 96
    assert any("engine config:" in r.getMessage() and "share_prefix=False" in r.getMessage()
               for r in caplog.records)  # the start-up log prints the effective config once
