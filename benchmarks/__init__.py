"""Benchmarks of fused_losses against its reference, torch.compile and peers (see README.md)."""
