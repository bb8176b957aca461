"""Qwen3-VL reranker and embedder parity with the official code on transformers' model (fp32, CPU)."""
import numpy as np
import pytest

from engine import Embedder, Reranker
from engine.prompts.images import ImageOptions, preprocess, smart_resize
from engine.prompts.inputs import Content, normalize_inputs
from tiny_qwen3_vl import Qwen3VLReference, image_processor, official_fetch, sample_images, tiny_qwen3_vl

ATOL = 1e-4


@pytest.fixture(scope="module")
def images():
    return sample_images()


@pytest.fixture(scope="module")
def vl_reranker(tmp_path_factory, qwen3_backend):
    folder = tiny_qwen3_vl(tmp_path_factory, qwen3_backend, "Qwen3-VL-Reranker-tiny")
    return folder, Reranker(str(folder), device="cpu"), Qwen3VLReference(folder)


@pytest.fixture(scope="module")
def vl_embedder(tmp_path_factory, qwen3_backend):
    folder = tiny_qwen3_vl(tmp_path_factory, qwen3_backend, "Qwen3-VL-Embedding-tiny")
    return folder, Embedder(str(folder), device="cpu"), Qwen3VLReference(folder, max_length=8192)


def as_ref(x):
    """An input of ours as the reference's (text or None, [PIL images])."""
    if isinstance(x, str):
        return (x or None, [])
    im = x.get("image", [])
    return (x.get("text"), im if isinstance(im, list) else [im])


# --- preprocessing ---------------------------------------------------------------------------------

def test_preprocessing_equals_reference_pixels_and_grid(images):
    proc, opts = image_processor(), ImageOptions()
    for name, img in images.items():
        ours = preprocess(img, opts, name)
        ref = proc(images=[official_fetch(img)], do_resize=False, return_tensors="np")
        assert list(ours.grid) == ref["image_grid_thw"][0].tolist(), name
        assert ours.pixel_values.shape == ref["pixel_values"].shape, name
        np.testing.assert_allclose(ours.pixel_values, ref["pixel_values"], atol=1e-6, rtol=0, err_msg=name)
    small = preprocess(images["100x70"], opts)  # the official preprocessing's example
    assert small.grid == (1, 4, 6) and small.pixel_values.shape == (24, 1536) and small.num_tokens == 6
    assert preprocess(images["1x1"], opts).grid == (1, 4, 4)  # upscaled to the 4,096-pixel minimum


def test_smart_resize_matches_reference_and_rounds_half_even():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    for h in (16, 48, 80, 100, 333, 1000, 2000, 4000):
        for w in (17, 80, 112, 700, 1500, 5000):
            if max(h, w) / min(h, w) <= 200 and min(h, w) > 16:  # below, see the (16, 112) case
                assert smart_resize(h, w) == ref(h, w, factor=32, min_pixels=4096, max_pixels=1843200), (h, w)
    # The official code (qwen-vl-utils) lifts a side that rounds to 0 to 32 before the pixel checks;
    # transformers' smart_resize does not, and would give (32, 192) here.
    assert smart_resize(16, 112) == (32, 128)
    assert smart_resize(48, 80) == (64, 64)  # 1.5 -> 2 and 2.5 -> 2: half to even
    assert smart_resize(5000, 5000, max_pixels=1310720) == (1120, 1120)  # the servers' max, configurable
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2100)


# --- reranker --------------------------------------------------------------------------------------

def rerank_cases(images):
    im = images
    return [
        ("what is the capital of china?", "Beijing is the capital."),  # text only
        ("a red square", {"image": im["square"]}),  # image only
        ("what does the caption say", {"text": "a caption under the picture", "image": im["100x70"]}),
        ("pages", {"text": "two pages", "image": [im["rgba"], im["1x1"], im["palette"]]}),  # several images
        ("tall", {"image": im["33x1000"]}),
        ("gray", {"text": "!! starts with punctuation", "image": im["gray"]}),
        ("empty document", ""),  # NULL
        ("\nnewline start", "\n\nnewline document"),
    ]


def test_rerank_scores_match_official_code(vl_reranker, images):
    _, ours, ref = vl_reranker
    for query, doc in rerank_cases(images):
        got = ours.predict([(query, doc)])[0]
        want = ref.score(as_ref(query), as_ref(doc))
        assert abs(got - want) <= ATOL, (query, got, want)


def test_rank_shares_the_text_query_prefix_and_matches(vl_reranker, images):
    _, ours, ref = vl_reranker
    docs = [d for _, d in rerank_cases(images)]
    stats: dict = {}
    ranked = ours.rank("which one shows a picture?", docs, stats=stats)
    assert stats["tokens_saved"] > 0  # the text query's prefix ran once for all documents
    got = {r["index"]: r["score"] for r in ranked}
    want = [ref.score(("which one shows a picture?", []), as_ref(d)) for d in docs]
    assert np.std(want) > 0.01, want
    np.testing.assert_allclose([got[i] for i in range(len(docs))], want, atol=ATOL, rtol=0)
    assert ranked[0]["document"] is docs[ranked[0]["index"]]  # documents come back as given


def test_image_queries_and_custom_instruction(vl_reranker, images):
    _, ours, ref = vl_reranker
    query = {"text": "find this", "image": images["square"]}
    docs = [{"image": images["square"]}, "some text", {"text": "x", "image": [images["gray"], images["rgba"]]}]
    instr = "Retrieve images that match"
    stats: dict = {}
    ranked = ours.rank(query, docs, instruction=instr, stats=stats)
    got = [r["score"] for r in sorted(ranked, key=lambda r: r["index"])]
    want = [ref.score(as_ref(query), as_ref(d), instruction=instr) for d in docs]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert stats["tokens_saved"] == 0  # a query with an image is not a shared prefix: whole pairs


def test_prefix_split_tokenizes_exactly(vl_reranker, images):
    _, ours, _ = vl_reranker
    tpl = ours.engine.template
    docs = normalize_inputs(["plain", "!!bang", "\nnewline", " space", "123", "", "<Document>:",
                             {"text": "with image", "image": images["square"]}], "documents", ImageOptions())
    head = tpl.encode_head("a query")
    tails = tpl.encode_tails(head, docs)
    whole = tpl.encode(["a query"] * len(docs), docs)
    for t, w in zip(tails, whole):
        assert list(head) + t.token_ids == w.token_ids
    assert tpl.encode_head(Content(["q"], [preprocess(images["square"], ImageOptions())])) is None


def test_batched_equals_single_with_images_packed(vl_reranker, images, tmp_path_factory):
    folder, _, _ = vl_reranker
    ours = Reranker(str(folder), device="cpu", max_batch_tokens=400)
    pairs = [(q, d) for q, d in rerank_cases(images)] + [({"image": images["gray"]}, {"image": images["rgba"]})]
    together = ours.predict(pairs)
    alone = [ours.predict([p])[0] for p in pairs]
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    assert ours.stats["batches"] > len(pairs)  # the budget split the pairs over several packed batches
    big = Reranker(str(folder), device="cpu", max_batch_tokens=100_000)
    visual, calls = big.engine.model.visual, []
    forward = visual.forward
    visual.forward = lambda pixels, grids: calls.append(len(grids)) or forward(pixels, grids)
    np.testing.assert_allclose(big.predict(pairs), together, atol=1e-5, rtol=0)
    n_images = sum(len(x.get("image", [])) if isinstance(x.get("image"), list) else 1
                   for p in pairs for x in p if isinstance(x, dict))
    assert calls == [n_images]  # every image of the batch through one packed vision-tower call


def test_truncation_keeps_images_and_the_last_five_tokens(vl_reranker, images, tmp_path_factory):
    folder, _, _ = vl_reranker
    ours = Reranker(str(folder), device="cpu", max_length=90)
    ref = Qwen3VLReference(folder, max_length=90)
    long = " ".join(["word"] * 200)
    for doc in (long, {"text": long, "image": images["100x70"]}):
        got = ours.predict([("q", doc)])[0]
        assert abs(got - ref.score(("q", []), as_ref(doc))) <= ATOL
    seq = ours.engine.template.encode(["q"], [long])[0].token_ids
    assert len(seq) == 95 and seq[-5:] == ours.engine.tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n",
                                                                        add_special_tokens=False)


# --- embedder --------------------------------------------------------------------------------------

def test_embeddings_match_official_code_with_matryoshka(vl_embedder, images):
    _, ours, ref = vl_embedder
    items = ["a photo of a cat", {"image": images["100x70"]}, {"text": "caption", "image": [images["rgba"],
             images["1x1"]]}, "", {"image": images["33x1000"]}]
    for dims in (None, 16, 8):
        got = ours.embed(items, dimensions=dims)
        want = np.stack([ref.embed(as_ref(x), dimensions=dims) for x in items])
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert ours.dimension == 32


def test_embed_instruction_gets_a_period(vl_embedder, images):
    _, ours, ref = vl_embedder
    item = {"text": "red", "image": images["square"]}
    got = ours.embed([item], instruction="  Find pictures of this colour ", is_query=True)[0]
    np.testing.assert_allclose(got, ref.embed(as_ref(item), instruction="Find pictures of this colour"), atol=ATOL)
    same = ours.embed([item], instruction="Find pictures of this colour.", is_query=True)[0]
    np.testing.assert_allclose(got, same, atol=1e-6)
    assert np.abs(got - ours.embed([item])[0]).max() > 1e-3  # the instruction matters


def test_reranker_over_vl_embedder_ranks_by_cosine(vl_embedder, images):
    folder, emb, _ = vl_embedder
    rr = Reranker(str(folder), device="cpu")
    assert rr.task == "embed"
    docs = [{"image": images["square"]}, "text doc", {"text": "t", "image": images["gray"]}]
    got = {r["index"]: r["score"] for r in rr.rank("query", docs)}
    want = emb.embed(docs) @ emb.embed(["query"], is_query=True)[0]
    np.testing.assert_allclose([got[i] for i in range(3)], want, atol=1e-5)


def test_prompt_tokens_count_language_model_tokens_only(vl_reranker, images):
    _, ours, _ = vl_reranker
    stats: dict = {}
    ours.predict([("q", {"image": images["square"]})], stats=stats)
    seq = ours.engine.template.encode(["q"], normalize_inputs([{"image": images["square"]}], "d", ImageOptions()))[0]
    assert stats["prompt_tokens"] == len(seq.token_ids)
    assert seq.cost == len(seq.token_ids) + 16  # the scheduler budgets the 16 patches of the vision tower too
    # Images wait for their batch as uint8 patches: an eighth of the fp32 pixel values.
    assert seq.multimodal[0].patches.dtype == np.uint8 and seq.multimodal[0].patches.nbytes == 16 * 768


def test_huge_text_is_cut_before_tokenizing_and_scores_as_the_whole(vl_reranker, images):
    _, ours, _ = vl_reranker
    tpl = ours.engine.template
    calls = []
    tokenize = tpl._ids
    tpl._ids = lambda texts: calls.append(max(len(t) for t in texts)) or tokenize(texts)
    try:
        huge = "many words in a row " * 200_000  # 4 MB of text, far past max_length tokens
        got = ours.predict([("q", {"text": huge, "image": images["square"]})])[0]
    finally:
        tpl._ids = tokenize
    assert max(calls) < 1_000_000  # the tokenizer saw a clipped text
    whole = tpl.encode(["q"], normalize_inputs([{"text": huge[:200_000], "image": images["square"]}], "d",
                                               ImageOptions()))[0]
    cut = tpl.encode(["q"], normalize_inputs([{"text": huge, "image": images["square"]}], "d", ImageOptions()))[0]
    assert cut.token_ids == whole.token_ids and len(cut.token_ids) == tpl.max_length + 5
    assert 0 < got < 1


def test_embedder_right_truncation_matches_and_never_cuts_an_image(vl_embedder, images):
    folder, _, _ = vl_embedder
    ours, ref = Embedder(str(folder), device="cpu", max_length=40), Qwen3VLReference(folder, max_length=40)
    long = " ".join(["word"] * 100)
    np.testing.assert_allclose(ours.embed([long])[0], ref.embed((long, [])), atol=ATOL)
    with pytest.raises(ValueError, match="images take 31 tokens.*would cut into an image"):
        ours.embed([{"text": long, "image": images["100x70"]}, {"image": images["33x1000"]}])


def test_reranker_refuses_documents_whose_images_leave_no_room(vl_reranker, images):
    folder, _, _ = vl_reranker
    ours = Reranker(str(folder), device="cpu", max_length=90)
    head = ours.engine.template.encode_head("a query")
    assert head is not None and len(head) < 90  # the query is shared
    # Truncation keeps every special token: 31 image pads (+ 2) and the template's leave too little of
    # max_length for the system prompt and query, which the official code would then cut.
    with pytest.raises(ValueError, match="images take 31 tokens, more than max_length=90 leaves beside the query"):
        ours.rank("a query", ["text", {"image": images["33x1000"]}])
    assert len(ours.rank("a query", ["short text " * 50])) == 1  # long text is cut, never refused
    # A query too long to share is scored in whole pairs, truncated as the official code does.
    ref = Qwen3VLReference(folder, max_length=90)
    long_query = "query words " * 40
    assert ours.engine.template.encode_head(long_query) is None
    got = ours.predict([(long_query, {"image": images["33x1000"]})])[0]
    assert abs(got - ref.score((long_query, []), (None, [images["33x1000"]]))) <= ATOL
