"""Keyword-to-caption (K2C): captions from tags with a seq2seq model (LAION-CLAP section 3.5).

- ``debias``: the gendered-word list and its replacement, counted.
- ``model``: loading a T5-family model and its tokenizer from a local directory, generating.
- ``stage``: ``clapscale k2c``: shard set in, new shard set out with ``text_augment_t5`` /
  ``text_augment_all``, distributed over ranks, resumable per shard.
- ``train``: ``clapscale k2c --train``: a small T5 trained on (tags -> caption) pairs of captioned shards.
"""
