"""What both example pipelines share: command line, data, networks, training engine, evaluation, studies, reports."""
