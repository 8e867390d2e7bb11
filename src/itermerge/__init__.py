"""itermerge: iterative DPO with a fixed reference, and the merge of its checkpoints."""

__version__ = "0.1.0"
