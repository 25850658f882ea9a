"""The decoder-only language model and its Hugging Face export."""
