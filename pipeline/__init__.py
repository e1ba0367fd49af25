"""Job specs, the DeepSpeed engine, the streaming loader, the training loop and the CLI."""
