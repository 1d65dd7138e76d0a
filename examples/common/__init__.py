"""What both example pipelines share: the command line, data held in memory or streamed, networks, the fusion layers,
training loop, checkpoints, distributed set-up and batch norm over all processes, memory settings, the corruptions, the
credibility measures, statistics over seeds, the runs of a study, and the reports."""
