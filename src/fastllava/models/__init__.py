"""Plain PyTorch modules of the LLaVA family."""
