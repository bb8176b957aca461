"""The model cards' own transformers code, used as the numerical reference."""
import torch

from engine.prompts.templates import QWEN3_RERANK_INSTRUCTION, QWEN3_RERANK_PREFIX, QWEN3_RERANK_SUFFIX


# The Qwen3-Reranker prompt written as a user's Jinja template (renders exactly the built-in prompt).
QWEN3_JINJA = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
    "<Instruct>: {{ instruction }}\n<Query>: {{ query }}\n<Document>: {{ document }}<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


class Qwen3RerankerReference:
    """Qwen3-Reranker model card code: left-padded batch, LM logits at the last position, softmax over [no, yes]."""

    def __init__(self, folder, max_length=8192):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.yes = self.tokenizer.convert_tokens_to_ids("yes")
        self.no = self.tokenizer.convert_tokens_to_ids("no")
        self.prefix = self.tokenizer.encode(QWEN3_RERANK_PREFIX, add_special_tokens=False)
        self.suffix = self.tokenizer.encode(QWEN3_RERANK_SUFFIX, add_special_tokens=False)
        self.max_length = max_length

    def encode(self, pairs, instruction=None):
        instruction = instruction or QWEN3_RERANK_INSTRUCTION
        texts = [f"<Instruct>: {instruction}\n<Query>: {q}\n<Document>: {d}" for q, d in pairs]
        inputs = self.tokenizer(texts, padding=False, truncation="longest_first", return_attention_mask=False,
                                max_length=self.max_length - len(self.prefix) - len(self.suffix))
        inputs["input_ids"] = [self.prefix + ids + self.suffix for ids in inputs["input_ids"]]
        return inputs

    @torch.inference_mode()
    def scores(self, pairs, instruction=None, batch_size=8):
        out = []
        for s in range(0, len(pairs), batch_size):
            inputs = self.encode(pairs[s : s + batch_size], instruction)
            batch = self.tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=self.max_length)
            # Full-vocabulary logits at the last position only (logits_to_keep=1 keeps memory bounded).
            logits = self.model(**batch, logits_to_keep=1).logits[:, -1, :]
            two = torch.stack([logits[:, self.no], logits[:, self.yes]], dim=1)
            out += torch.nn.functional.log_softmax(two, dim=1)[:, 1].exp().tolist()
        return out


    @torch.inference_mode()
    def logits(self, pairs, instruction=None):
        """l_yes - l_no at the last position, one unpadded pair at a time, in float64."""
        out = []
        for ids in self.encode(pairs, instruction)["input_ids"]:
            logits = self.model(torch.tensor([ids])).logits[0, -1].double()
            out.append(float(logits[self.yes] - logits[self.no]))
        return out


class Qwen3EmbeddingReference:
    """Qwen3-Embedding model card code: left padding, last-token pool, L2 normalise."""

    def __init__(self, folder, max_length=8192):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
        self.model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.max_length = max_length

    @torch.inference_mode()
    def embed(self, texts, dimensions=None):
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        emb = hidden[:, -1]
        if dimensions is not None:
            emb = emb[:, :dimensions]
        return torch.nn.functional.normalize(emb, p=2, dim=1)
