"""Training: the one loop (loop), the KD loss (distill), optimizers and their memory (optim, memory), GRPO (rl)."""
