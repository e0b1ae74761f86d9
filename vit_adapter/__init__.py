"""ViT-Adapter (Chen et al., ICLR 2023, arXiv 2205.08534) with one switch per ablation."""

__version__ = "0.1.0"
