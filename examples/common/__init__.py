"""What both example pipelines share: networks, training loop, checkpoints, distributed set-up, plots."""
