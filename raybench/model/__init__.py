"""The HybridVLM and its parts. Import `raybench.model.vlm.HybridVLM` (torch is heavy;
this package's __init__ stays light so configs validate without it)."""
