"""Torch modules of the Wan teacher: DiT, umT5 encoder and tokenizer, Wan2.1 VAE, attention."""
