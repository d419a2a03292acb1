"""Text conditioning helpers: the frozen caption encoder, its embedding cache, and a tiny local encoder for tests."""
