"""Layer 6, lab: the chapters' helpers, one module per theme (tokenization, embeddings, attention heads,
the forward pass by hand, decoding by hand, efficiency, interpretability, robustness)."""
