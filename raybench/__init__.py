"""raybench: train, search and serve hybrid-fusion vision-language models on Ray."""

__version__ = "0.1.0"
