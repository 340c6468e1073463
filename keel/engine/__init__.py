"""The sampling engine: token ids in; tokens, per-token sampler log-probs and finish flags out.

sampler.py (batched sampling with a preallocated KV cache, the sampling rule, and the
teacher-forced scorer), kvcache.py, batching.py (continuous batching for serving) and
backends.py (torch on any device, ONNX Runtime on any provider).
"""
