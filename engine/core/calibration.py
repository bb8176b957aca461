"""Score calibration: a reranker's raw logits mapped to probabilities of relevance.

``fit`` (scikit-learn, the ``calibrate`` extra) learns Platt scaling ``sigmoid(a * logit + b)`` or an
isotonic regression from labelled pairs; ``Calibration`` applies it with numpy alone. A file records
the method, its parameters and the model's identity (a hash of config.json and of the weights'
tensor names and shapes), so that a file fitted for one model is refused for another.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from engine.weights import checkpoint_index, read_config

METHODS = ("platt", "isotonic")
FORMAT = 1


def model_identity(folder) -> Dict[str, str]:
    """``{config_sha256, tensors_sha256}`` of a model folder (headers only: no weights are read)."""
    config = json.dumps(read_config(Path(folder)), sort_keys=True, separators=(",", ":"))
    index = checkpoint_index(Path(folder))
    tensors = json.dumps(sorted((name, list(info.shape)) for name, info in index.items()), separators=(",", ":"))
    return {"config_sha256": hashlib.sha256(config.encode()).hexdigest(),
            "tensors_sha256": hashlib.sha256(tensors.encode()).hexdigest()}


class CalibrationMismatch(ValueError):
    pass


@dataclass(frozen=True)
class Calibration:
    method: str
    params: dict
    model: Dict[str, str]

    def __call__(self, logits) -> np.ndarray:
        x = np.asarray(logits, dtype=np.float64)
        if self.method == "platt":
            z = self.params["a"] * x + self.params["b"]
            return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
        xs, ys = np.asarray(self.params["x"], np.float64), np.asarray(self.params["y"], np.float64)
        return np.interp(x, xs, ys).astype(np.float32)  # clipped to the fitted range at both ends

    def to_json(self) -> dict:
        return {"format": FORMAT, "method": self.method, "params": self.params, "model": self.model}

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path, folder=None) -> "Calibration":
        """Read a calibration file; with ``folder``, refuse it unless it was fitted for that model."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the calibration file {path}: {e}") from None
        if not isinstance(data, dict) or data.get("method") not in METHODS or not isinstance(data.get("params"), dict) \
                or not isinstance(data.get("model"), dict):
            raise ValueError(f"{path} is not a calibration file (expected method, params and model)")
        cal = cls(data["method"], data["params"], data["model"])
        if folder is not None:
            here = model_identity(folder)
            for key in ("config_sha256", "tensors_sha256"):
                if cal.model.get(key) != here[key]:
                    what = "config.json" if key == "config_sha256" else "weights (tensor names and shapes)"
                    raise CalibrationMismatch(f"{path} was fitted for another model: its {what} differ from "
                                              f"those of {Path(folder).name}")
        return cal


def fit(logits, labels, method: str = "platt", model: Optional[Dict[str, str]] = None) -> Calibration:
    """Fit ``method`` on raw logits and 0/1 labels (scikit-learn)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    try:
        from sklearn.isotonic import IsotonicRegression
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ImportError("fitting a calibration needs scikit-learn: pip install 'rerank-engine[calibrate]'") from None
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(x) != len(y) or len(x) < 2 or set(np.unique(y)) != {0, 1}:
        raise ValueError("calibration needs at least two labelled pairs, with both labels 0 and 1")
    if method == "platt":
        lr = LogisticRegression(C=1e6, max_iter=1000).fit(x[:, None], y)  # (almost) unregularized: a 1-D MLE
        params = {"a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0])}
    else:
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, y)
        params = {"x": [float(v) for v in iso.X_thresholds_], "y": [float(v) for v in iso.y_thresholds_]}
    return Calibration(method, params, dict(model or {}))


def metrics(probs, labels, bins: int = 10) -> Dict[str, float]:
    """Log-loss, Brier score and expected calibration error (equal-width bins) of probabilities."""
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(labels, np.float64)
    ece, edges = 0.0, np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(p[m].mean() - y[m].mean())
    return {"log_loss": float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()),
            "brier": float(((p - y) ** 2).mean()), "ece": float(ece)}
