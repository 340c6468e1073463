"""Serving: backends (torch, onnxruntime) behind one interface, a continuous-batching engine, and
an OpenAI-compatible FastAPI app (`keel serve`)."""
