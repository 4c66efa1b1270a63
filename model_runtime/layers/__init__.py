"""DeepSeek-V4 building blocks, one module per concept."""
