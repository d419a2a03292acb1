"""Training: the trainer and its loop, the command line, state (net, AdamW, EMAs), resume, loss scaling, online
evaluation, metrics and profiling."""
