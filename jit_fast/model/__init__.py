"""The JiT network and what it is made of: blocks, attention, embeddings, and the flow-matching objective."""
