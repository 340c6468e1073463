"""The sampling engine: token ids in; tokens, per-token sampler log-probs and finish flags out.

batching.py (the one engine: continuous batching, batched prefill and sampling; RL rollouts,
eval, label, parity and serve all run it), sampler.py (the sampling rule and the teacher-forced
scorer), kvcache.py (the torch backend's in-place KV cache) and backends.py (torch on any
device, ONNX Runtime on any provider).
"""
