"""`fastllava bench`: time to first token (vision, projector, prefill), decode speed, memory and
KV-cache bytes at real model sizes with random weights, optionally side by side with transformers."""
