"""Prompts and inputs: every family's template, user templates (Jinja or format strings), input shapes
(text, images, lists of parts), image loading, the tokenizer, truncation and token budgets."""
