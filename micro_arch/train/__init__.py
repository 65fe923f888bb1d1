"""Training: the loop, one optimizer step, batches on their way to the device, the bookkeeping around the
step (metrics, progress, checkpoints), clean stops, DDP from the outside, and the optimizers."""
