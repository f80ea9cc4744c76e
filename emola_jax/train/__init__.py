"""Training: LoRA + prior projector over a frozen base, sharded with `jit` over a device mesh."""
