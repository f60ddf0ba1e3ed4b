"""Loading models (hub, local, GGUF, placement, quantization) and computing response log-probs."""
