"""The inference engine (nano-vllm split): sequence, scheduler, KV pool, model runner, sampler, `LLM`, the async
engine the serving workers call, and the KV state's export format."""
