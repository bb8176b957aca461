"""Zero-shot classification: parity with per-pair reference scores, prefix reuse, bad input, min_score."""
import numpy as np
import pytest

from engine import Classifier, Reranker
from engine.classifier import CLASSIFY_INSTRUCTION
from reference_qwen3 import Qwen3RerankerReference

LABELS = {"sports": "This text is about sports and games.", "politics": "This text is about politics and government.",
          "science": "This text is about science and research.", "food": "This text is about food and cooking."}
TEXTS = ["The team won the league after a long season.", "Parliament passed the new budget law.",
         "The protein folds inside the cell.", "", "Bake the bread for forty minutes."]


@pytest.fixture(scope="module")
def folder(make_qwen3):
    return make_qwen3()


@pytest.fixture(scope="module")
def clf(folder):
    return Classifier(str(folder), device="cpu")


def test_classify_equals_argmax_of_reference_pair_scores(folder, clf):
    ref = Qwen3RerankerReference(folder)
    names, descs = list(LABELS), list(LABELS.values())
    out = clf.classify(TEXTS, LABELS)
    for i, text in enumerate(TEXTS):
        want = ref.scores([(text, d) for d in descs], instruction=CLASSIFY_INSTRUCTION, batch_size=1)
        got = [out[i]["scores"][n] for n in names]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert out[i]["label"] == names[int(np.argmax(want))]
        assert out[i]["index"] == i
    assert len({o["label"] for o in out}) > 1 or np.std([list(o["scores"].values()) for o in out]) > 0.01


def test_multi_label_and_threshold(clf):
    out = clf.classify(TEXTS[:2], LABELS, multi_label=True, threshold=0.0)
    assert all(set(o["label"]) == set(LABELS) for o in out)
    out = clf.classify(TEXTS[:2], LABELS, multi_label=True, threshold=1.01)
    assert all(o["label"] == [] for o in out)
    out = clf.classify(TEXTS[:2], list(LABELS), threshold=1.01)  # single-label: nothing confident enough
    assert all(o["label"] is None for o in out)


def test_prefix_reuse_token_accounting(clf):
    tpl = clf.reranker.engine.template
    text = "The team won the league after a long season and the players celebrated."
    labels = [f"label number {i}" for i in range(20)]
    head = tpl.encode_head(text, CLASSIFY_INSTRUCTION)
    label_tokens = [len(t) - len(tpl.suffix_ids) for t in tpl.encode_tails(head, labels).ids]
    clf.reranker.engine.prefix_cache.__init__(clf.reranker.engine.prefix_cache.max_bytes)
    stats = {}
    clf.classify([text], labels, stats=stats)
    assert stats["tokens_computed"] <= len(head) + sum(n + len(tpl.suffix_ids) for n in label_tokens), stats
    assert stats["tokens_saved"] == 19 * len(head)


@pytest.mark.parametrize("labels,err,match", [
    ([], ValueError, "must not be empty"),
    ({}, ValueError, "must not be empty"),
    (["a", "b", "a"], ValueError, "duplicate label 'a'"),
    (["a", 3], TypeError, r"labels\[1\]"),
    ({"a": None}, TypeError, "description of label 'a'"),
    ("abc", TypeError, "not a string"),
])
def test_bad_labels(clf, labels, err, match):
    with pytest.raises(err, match=match):
        clf.classify(["text"], labels)


def test_bad_texts(clf):
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        clf.classify(["ok", None], ["a", "b"])
    assert clf.classify([], ["a"]) == []


def test_min_score_filters_after_top_n(folder):
    rr = Reranker(str(folder), device="cpu")
    docs = ["apple", "banana split", "the capital of china", "gravity", "a b c"]
    full = rr.rank("query", docs)
    cut = sorted(r["score"] for r in full)[2]
    got = rr.rank("query", docs, min_score=cut)
    assert [r["index"] for r in got] == [r["index"] for r in full if r["score"] >= cut]
    assert len(got) == 3
    assert [r["index"] for r in rr.rank("query", docs, top_n=2, min_score=cut)] == [r["index"] for r in full[:2]]
    with pytest.raises(TypeError, match="min_score"):
        rr.rank("query", docs, min_score="high")
