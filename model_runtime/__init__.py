"""dsv4 model runtime: config, checkpoint loading, the DeepSeek-V4 model, KV state, engine and tokenizer."""
