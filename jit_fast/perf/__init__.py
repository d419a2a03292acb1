"""Performance modeling without a GPU: traffic, launch and FLOP counts on fake tensors, the roofline projection."""
