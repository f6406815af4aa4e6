"""Local training, held-out evaluation and cost accounting (plain PyTorch loops)."""
