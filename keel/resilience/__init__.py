"""Surviving unstable accelerators: exact checkpoints, guarded steps, fault injection."""
