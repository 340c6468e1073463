"""Portable formats and proof that they compute the same thing: ONNX export (`keel export`) and
backend parity checks (`keel parity`)."""
