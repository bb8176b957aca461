"""Tiny random KaLM-Reranker (T5Gemma2) checkpoints and the transformers reference path.

The checkpoint is built with transformers' config classes (a tiny SigLIP vision
tower included, as real checkpoints carry one) and saved as safetensors; the
tokenizer is a word-level ``tokenizers`` model with the tokens the template
needs. The reference scores pairs the KaLM way with stock transformers:
encoder -> masked mean over groups of r tokens -> decoder with those states and
the pooled mask -> logits at the last position -> sigmoid(l_yes - l_no).
"""
from pathlib import Path

import torch

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<end_of_image>"]
WORDS = (
    "the of and to in is was for on that with as by at from his an were are which this be or had "
    "river mountain city engine model search query passage answer capital china beijing gravity "
    "attracts bodies toward one another protein cell energy market price history war king music "
    "film game team season league player water climate ocean forest bird animal plant yes no "
    "Document Query Instruct Judge whether meets requirements based provided Note can only "
    "Given retrieve documents answer piece text relevant label descriptions best match user model"
).split()
PUNCT = ["<", ">", ":", ".", ",", "?", "\"", "\n", " ", "'", "-", "!"]
SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
          'Note that the answer can only be "yes" or "no".')
INSTRUCTION = "Given a query, retrieve documents that answer the query."


def save_tokenizer(folder: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Words and punctuation, bare or with one leading space (as SentencePiece's "▁word"), so that
    # a text of n words is about n tokens.
    pieces = list(dict.fromkeys(WORDS)) + PUNCT
    vocab = {t: i for i, t in enumerate(SPECIAL + pieces + [" " + p for p in pieces if p not in (" ", "\n")])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?\w+| ?[^\w\s]|\n| +"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>",
                                   additional_special_tokens=["<start_of_turn>", "<end_of_turn>", "<end_of_image>"])
    fast.save_pretrained(str(folder))
    return fast


def build_kalm(folder: Path, seed: int = 0, layers: int = 3, sliding_window: int = 7, vocab_size: int = 320,
               hidden: int = 64, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, intermediate: int = 96,
               query_pre_attn_scalar: int = 24, init: float = 0.15, full_every: int = 0, dtype=torch.float32):
    """Save a random T5Gemma2ForConditionalGeneration (+ tokenizer) in ``folder``; returns the model.

    Layer types: sliding, with the last layer full, or every ``full_every``-th layer full (Gemma's 5:1).
    """
    from transformers import (SiglipVisionConfig, T5Gemma2Config, T5Gemma2DecoderConfig, T5Gemma2EncoderConfig,
                              T5Gemma2ForConditionalGeneration, T5Gemma2TextConfig)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast = save_tokenizer(folder)
    eoi = fast.convert_tokens_to_ids("<end_of_image>")
    if full_every:
        types = ["full_attention" if (i + 1) % full_every == 0 else "sliding_attention" for i in range(layers)]
    else:
        types = (["sliding_attention"] * (layers - 1) + ["full_attention"])[:layers]
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                sliding_window=sliding_window, layer_types=types, query_pre_attn_scalar=query_pre_attn_scalar,
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                initializer_range=init, rms_norm_eps=1e-6)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=8)
    enc = T5Gemma2EncoderConfig(text_config=T5Gemma2TextConfig(**text), vision_config=vision, mm_tokens_per_image=4,
                                boi_token_index=vocab_size - 3, eoi_token_index=eoi, image_token_index=vocab_size - 2,
                                initializer_range=init)
    cfg = T5Gemma2Config(encoder=enc, decoder=T5Gemma2DecoderConfig(**text), image_token_index=vocab_size - 2,
                         initializer_range=init)
    torch.manual_seed(seed)
    model = T5Gemma2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # trained checkpoints have non-trivial norms and an eoi vector; so should the test
        for name, p in model.named_parameters():
            if "norm" in name or "eoi_embedding" in name:
                p.normal_(0.0, 0.3)
    model = model.to(dtype)
    model.save_pretrained(str(folder))
    return model


class KaLMReference:
    """Stock transformers forward of the KaLM recipe, batch by batch (fp32)."""

    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer
        self.yes = tokenizer.convert_tokens_to_ids("yes")
        self.no = tokenizer.convert_tokens_to_ids("no")

    def prompt(self, query: str, instruction: str = INSTRUCTION) -> str:
        return (f"<bos><start_of_turn>user\n{SYSTEM}\n\n<Instruct>: {instruction}\n<Query>: {query}<end_of_turn>\n"
                f"<start_of_turn>model\n\n\n\n")

    @torch.no_grad()
    def margins(self, pairs, ratio: int = 4, instruction: str = INSTRUCTION) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        out = []
        for query, doc in pairs:  # one pair at a time: no decoder padding to reason about
            ids = self.tok(f"<Document>: {doc}", add_special_tokens=False, truncation=True,
                           max_length=1024)["input_ids"]
            pad = -len(ids) % ratio
            enc_ids = torch.tensor([ids + [0] * 5])  # trailing pad tokens exercise the masks
            mask = torch.tensor([[1] * len(ids) + [0] * 5])
            h = self.model.get_encoder()(input_ids=enc_ids, attention_mask=mask).last_hidden_state
            h, mask = h[:, : len(ids)], mask[:, : len(ids)]
            h = torch.cat((h, torch.zeros(1, pad, h.shape[-1])), 1)  # masked chunk mean over groups of r
            m = torch.cat((mask, torch.zeros(1, pad, dtype=mask.dtype)), 1).float()
            hs, ms = h.view(1, -1, ratio, h.shape[-1]), m.view(1, -1, ratio)
            pooled = (hs * ms[..., None]).sum(2) / ms.sum(2).clamp(min=1)[..., None]
            pooled_mask = (ms.sum(2) > 0).long()
            dec = torch.tensor([self.tok(self.prompt(query, instruction), add_special_tokens=False)["input_ids"]])
            logits = self.model(attention_mask=pooled_mask, encoder_outputs=BaseModelOutput(last_hidden_state=pooled),
                                decoder_input_ids=dec).logits[0, -1].float()
            out.append(logits[self.yes] - logits[self.no])
        return torch.stack(out)

    def scores(self, pairs, ratio: int = 4, instruction: str = INSTRUCTION):
        return torch.sigmoid(self.margins(pairs, ratio, instruction)).tolist()
