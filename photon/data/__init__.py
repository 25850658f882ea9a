"""Raw text to token shards: corpora, tokenizer, memmapped shards, client partitions, the built-in corpus."""
