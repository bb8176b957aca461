"""Tiny random Qwen3-VL checkpoints, test images, and the official code's scoring as the reference.

The checkpoint is transformers' ``Qwen3VLForConditionalGeneration`` with random weights at
the smallest shapes the architecture allows (hidden 32, a vision tower of hidden 32), saved
as safetensors with the real Qwen vocabulary. The reference follows the official
Qwen3-VL-Reranker / -Embedding code: its messages rendered as the chat template renders
them, its image loading (RGBA onto white, smart_resize, PIL resize), transformers' image
processor with ``do_resize=False``, and transformers' model for the hidden states.
"""
import numpy as np
import torch

from qwen_vocab import QWEN3_SPECIAL_TOKENS

VL_EXTRA_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
assert all(t in QWEN3_SPECIAL_TOKENS for t in VL_EXTRA_SPECIAL)


def make_tiny_qwen3_vl(folder, backend, layers=2, depth=2, deepstack=(0, 1), tie=True, seed=0):
    from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=151669, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-6,
                         rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
                         rope_theta=5_000_000.0, initializer_range=0.2, tie_word_embeddings=tie),
        vision_config=dict(depth=depth, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=16,
                           deepstack_visual_indexes=list(deepstack), initializer_range=0.2),
        tie_word_embeddings=tie,
    )
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger random weights: scores spread over (0, 1), images matter
        for name, p in model.named_parameters():
            if p.dim() > 1 and "visual" in name:
                p.normal_(0.0, 0.2)
            elif "visual" in name and name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  extra_special_tokens=VL_EXTRA_SPECIAL)
    tok.save_pretrained(str(folder))
    return folder


_BUILT: dict = {}

TINY_SHAPES = {
    # Two decoder layers, two ViT blocks, DeepStack after both; tied embeddings.
    "Qwen3-VL-Reranker-tiny": dict(layers=2, depth=2, deepstack=(0, 1), tie=True, seed=0),
    # One decoder layer, one ViT block, no DeepStack, an untied LM head.
    "Qwen3-VL-Embedding-tiny": dict(layers=1, depth=1, deepstack=(), tie=False, seed=1),
}


def tiny_qwen3_vl(tmp_path_factory, backend, name):
    """A tiny checkpoint of TINY_SHAPES, built once per test session."""
    if name not in _BUILT:
        _BUILT[name] = make_tiny_qwen3_vl(tmp_path_factory.mktemp("vl") / name, backend, **TINY_SHAPES[name])
    return _BUILT[name]


# --- images made here ------------------------------------------------------------------------------

def sample_images(seed=0):
    """name -> PIL image: odd sizes, RGBA, palette, grayscale, a 1x1 that smart_resize upscales."""
    from PIL import Image

    rs = np.random.RandomState(seed)

    def rgb(w, h):
        return Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8))

    rgba = rs.randint(0, 256, (50, 64, 4), dtype=np.uint8)
    gray = Image.fromarray(rs.randint(0, 256, (40, 90), dtype=np.uint8))
    pal = rgb(45, 60).convert("P", palette=Image.ADAPTIVE, colors=16)
    return {"100x70": rgb(100, 70), "33x1000": rgb(33, 1000), "1x1": rgb(1, 1), "rgba": Image.fromarray(rgba),
            "palette": pal, "gray": gray, "square": rgb(64, 64)}


# --- the official code as reference -----------------------------------------------------------------

def official_to_rgb(img):
    from PIL import Image

    if img.mode == "RGBA":
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.split()[3])
        return bg
    return img.convert("RGB")


def official_fetch(img, min_pixels=4 * 32 * 32, max_pixels=1800 * 32 * 32):
    """Image loading as the official code does it; transformers' smart_resize (factor 32)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    img = official_to_rgb(img)
    h, w = smart_resize(img.height, img.width, factor=32, min_pixels=min_pixels, max_pixels=max_pixels)
    return img.resize((w, h))


def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3)


def render(messages):
    """The Qwen3-VL chat template on messages of text/image parts, with the generation prompt."""
    out = ""
    for m in messages:
        out += f"<|im_start|>{m['role']}\n"
        for p in m["content"]:
            out += "<|vision_start|><|image_pad|><|vision_end|>" if p["type"] == "image" else p["text"]
        out += "<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


def side(prefix, text=None, images=()):
    """The official format_mm_content: prefix, images, texts; NULL when empty."""
    texts = [] if text is None else [text] if isinstance(text, str) else list(text)
    content = [] if prefix is None else [{"type": "text", "text": prefix}]
    if not texts and not images:
        return content + [{"type": "text", "text": "NULL"}]
    return content + [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": t} for t in texts]


class Qwen3VLReference:
    def __init__(self, folder, max_length=10240):
        from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

        self.lm = Qwen3VLForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(str(folder))
        self.proc = image_processor()
        self.max_length = max_length
        w = self.lm.lm_head.weight
        self.w = (w[self.tok.get_vocab()["yes"]] - w[self.tok.get_vocab()["no"]]).detach().float()

    def inputs(self, messages, rerank: bool):
        text = render(messages)
        images = [official_fetch(p["image"]) for m in messages for p in m["content"] if p["type"] == "image"]
        kw = {}
        if images:
            feats = self.proc(images=images, do_resize=False, return_tensors="pt")
            kw = dict(pixel_values=feats["pixel_values"], image_grid_thw=feats["image_grid_thw"])
            parts = text.split("<|image_pad|>")
            counts = (feats["image_grid_thw"].prod(-1) // 4).tolist()
            text = parts[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, parts[1:]))
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if rerank:  # the official truncate_tokens_optimized on all but the last 5 tokens
            body, special = ids[:-5], set(self.tok.all_special_ids)
            if len(body) > self.max_length:
                keep = self.max_length - sum(t in special for t in body)
                out, kept = [], 0
                for t in body:
                    if t in special or kept < keep:
                        out.append(t)
                        kept += t not in special
                body = out
            ids = body + ids[-5:]
        else:
            ids = ids[: self.max_length]
        ids = torch.tensor([ids])
        kw["mm_token_type_ids"] = (ids == 151655).int()
        return ids, kw

    @torch.inference_mode()
    def last_hidden(self, messages, rerank):
        ids, kw = self.inputs(messages, rerank)
        return self.lm.model(input_ids=ids, **kw).last_hidden_state[0, -1].float()

    def score(self, query, doc, instruction=None):
        """query/doc: (text or None, [PIL images])."""
        instruction = instruction or "Given a search query, retrieve relevant candidates that answer the query."
        system = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
                  'Note that the answer can only be "yes" or "no".')
        user = ([{"type": "text", "text": "<Instruct>: " + instruction}] + side("<Query>:", *query)
                + side("\n<Document>:", *doc))
        h = self.last_hidden([{"role": "system", "content": [{"type": "text", "text": system}]},
                              {"role": "user", "content": user}], rerank=True)
        return torch.sigmoid(h @ self.w).item()

    def embed(self, item, instruction=None, dimensions=None):
        import unicodedata

        if instruction:
            instruction = instruction.strip()
            if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
                instruction += "."
        system = instruction or "Represent the user's input."
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]},
                    {"role": "user", "content": side(None, *item)}]
        e = self.last_hidden(messages, rerank=False)
        if dimensions is not None:
            e = e[:dimensions]
        return torch.nn.functional.normalize(e, dim=-1).numpy()

