"""Registry: architectures, task inference, and that every claimed architecture has a parity test."""
import logging
from pathlib import Path

import pytest

from engine import Reranker

from engine.models import registry


def test_task_inference_logs_choice(make_qwen3, caplog):
    spec = registry.ARCHITECTURES["Qwen3ForCausalLM"]
    with caplog.at_level(logging.INFO, logger="engine"):
        assert registry.infer_task(spec, "Qwen/Qwen3-Reranker-0.6B", None) == "rerank"
    assert "rerank" in caplog.text
    assert registry.infer_task(spec, "Qwen/Qwen3-Embedding-0.6B", None) == "embed"
    assert registry.infer_task(spec, "my-model", None, default="embed") == "embed"
    assert registry.infer_task(spec, "Qwen3-Embedding", "rerank") == "rerank"
    with pytest.raises(ValueError, match="task must be"):
        registry.infer_task(spec, "x", "classify")
    # An embedding-only model asked to rerank ranks by cosine similarity, and says so.
    with caplog.at_level(logging.INFO, logger="engine"):
        assert registry.infer_task(registry.ARCHITECTURES["Qwen3Model"], "x", "rerank") == "embed"
    assert "cosine similarity" in caplog.text
    with pytest.raises(ValueError, match="does not support task 'embed'"):
        registry.infer_task(registry.ARCHITECTURES["T5Gemma2ForConditionalGeneration"], "x", "embed")


def test_explicit_task_overrides_name(make_qwen3):
    rr = Reranker(str(make_qwen3()), task="embed", device="cpu")
    assert rr.task == "embed"


# Where each architecture's parity test against transformers lives.
PARITY_TESTS = {
    "Qwen3ForCausalLM": "tests/models/test_qwen3_parity.py",
    "Qwen3Model": "tests/models/test_qwen3_parity.py",
    "BertModel": "tests/models/test_bert_parity.py",
    "BertForSequenceClassification": "tests/models/test_bert_parity.py",
    "XLMRobertaModel": "tests/models/test_bert_parity.py",
    "XLMRobertaForSequenceClassification": "tests/models/test_bert_parity.py",
    "Qwen3_5ForCausalLM": "tests/models/test_qwen3_5_parity.py",
    "Qwen3_5ForConditionalGeneration": "tests/models/test_qwen3_5_parity.py",
    "T5Gemma2ForConditionalGeneration": "tests/models/test_t5gemma2_parity.py",
    "MLQwen3Model": "tests/models/test_querit_parity.py",
    "Qwen3VLForConditionalGeneration": "tests/models/test_qwen3_vl_parity.py",
}


def test_every_architecture_has_a_parity_test():
    root = Path(__file__).resolve().parents[2]
    for arch in registry.supported_architectures():
        assert arch in PARITY_TESTS, f"{arch} is registered without a parity test"
        assert (root / PARITY_TESTS[arch]).is_file()
