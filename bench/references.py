"""The model cards' own transformers code, which the end-to-end benchmarks time ours against.

Written from the model cards (and the official Qwen3-VL-Reranker code), not from the
engine: their prompts are spelled out here, so a reference does not share the engine's
templates, and a score gap between the two is a real one.
"""
import torch

RERANK_SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
                 'Note that the answer can only be "yes" or "no".')


class Qwen3RerankerReference:
    """Qwen3-Reranker's model card: its prompt around each pair, left-padded batches; the score is
    softmax over the [no, yes] logits at the last position (see e2e_rerank.reference_scores)."""

    prefix = f"<|im_start|>system\n{RERANK_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    task = "Given a web search query, retrieve relevant passages that answer the query"

    def __init__(self, folder, max_length: int = 8192):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.yes = self.tokenizer.convert_tokens_to_ids("yes")
        self.no = self.tokenizer.convert_tokens_to_ids("no")
        self.prefix_ids = self.tokenizer.encode(self.prefix, add_special_tokens=False)
        self.suffix_ids = self.tokenizer.encode(self.suffix, add_special_tokens=False)
        self.max_length = max_length

    def encode(self, pairs):
        """The model card's ``process_inputs`` before padding: ``{"input_ids": [[...], ...]}``."""
        texts = [f"<Instruct>: {self.task}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
        room = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        inputs = self.tokenizer(texts, padding=False, truncation="longest_first", return_attention_mask=False,
                                max_length=room)
        inputs["input_ids"] = [self.prefix_ids + ids + self.suffix_ids for ids in inputs["input_ids"]]
        return inputs


class Qwen3VLReference:
    """The official Qwen3-VL-Reranker scoring, one pair at a time: its messages through the chat
    template, its image loading (RGBA onto white, smart_resize to multiples of 32), transformers'
    image processor without resizing, and sigmoid(last hidden state . (w_yes - w_no))."""

    instruction = "Given a search query, retrieve relevant candidates that answer the query."

    def __init__(self, folder, device: str = "cpu", dtype=torch.float32, max_length: int = 10240):
        from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.tok = AutoTokenizer.from_pretrained(str(folder))
        lm = Qwen3VLForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
        vocab = self.tok.get_vocab()
        w = lm.lm_head.weight
        self.w = (w[vocab["yes"]] - w[vocab["no"]]).detach().float().to(device)
        self.model = lm.model.to(device=device, dtype=dtype)  # the LM head is not needed past w
        self.proc = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3)
        self.image_pad = vocab["<|image_pad|>"]
        self.device, self.max_length = device, max_length

    @staticmethod
    def load_image(img, min_pixels=4 * 32 * 32, max_pixels=1800 * 32 * 32):
        from PIL import Image
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        if img.mode == "RGBA":
            bg = Image.new("RGB", img.size, (255, 255, 255))
            bg.paste(img, mask=img.split()[3])
            img = bg
        img = img.convert("RGB")
        h, w = smart_resize(img.height, img.width, factor=32, min_pixels=min_pixels, max_pixels=max_pixels)
        return img.resize((w, h))

    @staticmethod
    def content(prefix, text, images):
        """The official format_mm_content: the prefix, the images, the text; "NULL" when both are empty."""
        parts = [{"type": "text", "text": prefix}]
        if text is None and not images:
            return parts + [{"type": "text", "text": "NULL"}]
        parts += [{"type": "image", "image": im} for im in images]
        return parts + ([] if text is None else [{"type": "text", "text": text}])

    @torch.inference_mode()
    def score(self, query, doc, instruction=None):
        """``query`` and ``doc``: (text or None, [PIL images])."""
        user = ([{"type": "text", "text": "<Instruct>: " + (instruction or self.instruction)}]
                + self.content("<Query>:", *query) + self.content("\n<Document>:", *doc))
        text = f"<|im_start|>system\n{RERANK_SYSTEM}<|im_end|>\n<|im_start|>user\n"
        text += "".join("<|vision_start|><|image_pad|><|vision_end|>" if p["type"] == "image" else p["text"]
                        for p in user)
        text += "<|im_end|>\n<|im_start|>assistant\n"
        images = [self.load_image(p["image"]) for p in user if p["type"] == "image"]
        kw = {}
        if images:
            feats = self.proc(images=images, do_resize=False, return_tensors="pt")
            kw = dict(pixel_values=feats["pixel_values"].to(self.device),
                      image_grid_thw=feats["image_grid_thw"].to(self.device))
            # Each image's placeholder becomes one <|image_pad|> per merged 2x2 patch.
            counts = (feats["image_grid_thw"].prod(-1) // 4).tolist()
            first, *rest = text.split("<|image_pad|>")
            text = first + "".join("<|image_pad|>" * n + tail for n, tail in zip(counts, rest))
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        # The official code truncates all but the last 5 tokens to max_length (keeping the special
        # tokens); the bench's pairs are never that long, so that is not reproduced here.
        assert len(ids) - 5 <= self.max_length, f"{len(ids)} tokens: the reference does not truncate"
        ids = torch.tensor([ids], device=self.device)
        h = self.model(input_ids=ids, mm_token_type_ids=(ids == self.image_pad).int(), **kw).last_hidden_state
        return torch.sigmoid(h[0, -1].float() @ self.w).item()
