"""The decoder-only language model, its FLOP count and its Hugging Face export."""
