"""Tokenizers and the embedding tables the head is tied to.

Entry-point modules: `gpt2` (entry point `gpt2`: the `gpt2` tokenizer from `gpt2_tokenizer` and the
`gpt2` embedding from `gpt2_embedding`), `simple` (`simple_tokenizers`: tokenizers `bytes`, `bpe`),
`random_embedding` (`random_embedding`: embedding `random`).
"""
