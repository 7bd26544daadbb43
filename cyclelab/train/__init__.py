"""Layer 4, train: the training loop and fine-tuning methods, training the course's own `tiny`, evaluation
metrics, and chapter 06's tasks."""
