"""Model folders: resolve, read config, validate and load safetensors weights.

Only safetensors are read (never pickled ``.bin`` files). Everything is
validated from the safetensors headers before a byte of weight is copied: a
missing tensor, an unexpected tensor, a shape mismatch or a non-float dtype
raises a ``WeightError`` that names the tensor.
"""
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
from safetensors import safe_open
from torch import nn

log = logging.getLogger("engine")

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "1_Pooling/*", "2_Normalize/*"]
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class WeightError(ValueError):
    """A checkpoint that does not match the model it is loaded into."""


class ModelNotFoundError(FileNotFoundError):
    """A model that is neither a local folder nor reachable on the hub."""


def resolve_model(model) -> Path:
    """A local folder as is, else a hub id downloaded (safetensors only) with huggingface_hub."""
    path = Path(os.path.expanduser(str(model)))
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{model!r} is a file; expected a model folder or a hub id")
    name = str(model)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not name:
        raise ModelNotFoundError(f"model folder {name!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelNotFoundError(f"{name!r} is not a local folder and huggingface_hub is not installed") from e
    try:
        # The local cache first: works offline for models fetched before.
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise ModelNotFoundError(
            f"{name!r} is not a local folder and could not be downloaded from the Hugging Face hub "
            f"({type(e).__name__}: {_one_line(e)}). If this machine is offline, pass the path of a folder that holds "
            f"config.json, the safetensors weights and the tokenizer files."
        ) from e


def _one_line(e: Exception, limit: int = 300) -> str:
    """An exception's text on one line (huggingface_hub's span several), shortened past ``limit``."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ModelFileError(ValueError):
    """A model file that is unreadable or malformed; the message names the file."""


def read_json(path: Path, expect=dict):
    """A JSON file of a model folder; an unreadable or malformed one is a ModelFileError naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: cannot be read ({e})") from None
    if expect is not None and not isinstance(data, expect):
        raise ModelFileError(f"{path}: expected an object, got {type(data).__name__}")
    return data


def read_config(folder: Path) -> dict:
    f = Path(folder) / "config.json"
    if not f.is_file():
        raise ModelNotFoundError(f"config.json is missing in {folder}")
    return read_json(f)


@dataclass
class TensorInfo:
    file: Path
    shape: Tuple[int, ...]
    dtype: str


def checkpoint_index(folder: Path) -> Dict[str, TensorInfo]:
    """Checkpoint tensor name -> (file, shape, dtype), from the headers only."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFileError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        if found:
            files = found
        else:
            bins = sorted(p.name for p in folder.glob("*.bin"))
            hint = f" (found {', '.join(bins)}: pickled weights are never loaded; convert them to safetensors)" if bins else ""
            raise WeightError(f"no model.safetensors or model.safetensors.index.json in {folder}{hint}")
    out: Dict[str, TensorInfo] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise WeightError(f"weight shard {name} listed in the index is missing from {folder}")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    out[key] = TensorInfo(path, tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ModelFileError(f"{path}: truncated or not a safetensors file ({type(e).__name__}: {e})") from None
    return out


def _finite(t: torch.Tensor, name: str, path) -> torch.Tensor:
    """``t``, checked for NaN and Inf: a broken checkpoint fails at load, naming the tensor, not at
    every request later."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise WeightError(f"tensor {name} in {Path(path).name} holds {bad} NaN or Inf value(s)")
    return t


def read_rows(info: TensorInfo, name: str, rows: Iterable[int]) -> torch.Tensor:
    """Read a few rows of a 2-D tensor without loading the rest (e.g. two LM-head rows)."""
    with safe_open(str(info.file), framework="pt") as f:
        sl = f.get_slice(name)
        return _finite(torch.cat([sl[r : r + 1] for r in rows]), name, info.file)


def read_tensor(info: TensorInfo, name: str) -> torch.Tensor:
    with safe_open(str(info.file), framework="pt") as f:
        return _finite(f.get_tensor(name), name, info.file)


def load_weights(
    model: nn.Module,
    index: Dict[str, TensorInfo],
    *,
    strip_prefixes: Tuple[str, ...] = ("model.",),
    reserved: Set[str] = frozenset(),
    ignore: Callable[[str], bool] = lambda name: False,
) -> Set[str]:
    """Load checkpoint tensors into ``model`` (fusing shards per ``packed_modules_mapping``).

    ``reserved``: checkpoint names (as stored, or after prefix stripping) consumed elsewhere, e.g.
    ``lm_head.weight`` read by a head. ``ignore``: names that may be present and are skipped.
    Returns the set of checkpoint names loaded. Raises WeightError before copying anything
    if a parameter would be missing, loaded twice, or mis-shaped, or a tensor is unexpected.
    """
    packed = model.packed_modules_mapping
    params = dict(model.named_parameters())
    # Every (param, shard) that must be filled, and by which checkpoint name.
    needed: Dict[Tuple[str, object], Optional[str]] = {}
    for pname, p in params.items():
        for sid in getattr(p, "shard_ids", (None,)):
            needed[(pname, sid)] = None

    plan: List[Tuple[str, str, object]] = []  # (checkpoint name, param name, shard id)
    unexpected = []
    for ck_name, info in index.items():
        name = ck_name
        for pre in strip_prefixes:
            if name.startswith(pre):
                name = name[len(pre):]
                break
        if name in reserved or ck_name in reserved or ignore(name):
            continue
        target, sid = name, None
        for src, (dst, shard) in packed.items():
            if f".{src}." in f".{name}":
                target, sid = name.replace(src, dst), shard
                break
        if (target, sid) not in needed:
            unexpected.append(ck_name)
            continue
        if needed[(target, sid)] is not None:
            raise WeightError(f"tensor {ck_name} loads {target} (shard {sid!r}) already loaded from {needed[(target, sid)]}")
        if info.dtype not in _FLOAT_DTYPES:
            raise WeightError(f"tensor {ck_name} has dtype {info.dtype}; expected a float dtype")
        p = params[target]
        if sid is None:
            expect = tuple(p.shape)
        else:
            off, size = p.weight_loader.__self__.shard_slices[sid]
            expect = (size,) + tuple(p.shape[1:])
        if tuple(info.shape) != expect:
            raise WeightError(f"tensor {ck_name} has shape {tuple(info.shape)}; {target} expects {expect}")
        needed[(target, sid)] = ck_name
        plan.append((ck_name, target, sid))
    if unexpected:
        raise WeightError(f"unexpected tensor(s) in checkpoint: {', '.join(sorted(unexpected)[:10])}"
                          + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
    missing = [(p, s) for (p, s), src in needed.items() if src is None]
    if missing:
        names = [_checkpoint_name(p, s, packed) for p, s in missing]
        raise WeightError(f"missing tensor(s) in checkpoint: {', '.join(sorted(names)[:10])}"
                          + (f" and {len(names) - 10} more" if len(names) > 10 else ""))

    by_file: Dict[Path, List[Tuple[str, str, object]]] = {}
    for item in plan:
        by_file.setdefault(index[item[0]].file, []).append(item)
    for path, items in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for ck_name, target, sid in items:
                p = params[target]
                t = _finite(f.get_tensor(ck_name), ck_name, path)
                t = t.to(p.dtype)
                if sid is None:
                    p.weight_loader(p, t)
                else:
                    p.weight_loader(p, t, sid)
    return {ck for ck, _, _ in plan}


def _checkpoint_name(param: str, shard, packed) -> str:
    if shard is None:
        return param
    for src, (dst, sid) in packed.items():
        if sid == shard and f".{dst}." in f".{param}":
            return param.replace(dst, src)
    return f"{param}[{shard}]"
