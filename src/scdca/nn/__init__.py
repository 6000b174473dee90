"""Neural-network parts: the scGPT-style backbone, adapters, PEFT layers, pretraining, devices and DDP."""
