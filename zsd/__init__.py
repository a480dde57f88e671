"""zsd: zero-shot distillation of CLIP image encoders from cached teacher embeddings.

The package layout follows the data flow:
sources (images) -> teachers -> store (Zarr embeddings) -> train (students) -> evaluate / coverage.
"""

__version__ = "0.1.0"
