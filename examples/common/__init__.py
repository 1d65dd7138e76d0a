"""What both example pipelines share: the command line, data held in memory or streamed, networks, training
loop, checkpoints, distributed set-up and batch norm over all processes, memory settings, plots."""
