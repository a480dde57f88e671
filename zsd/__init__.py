"""zsd: zero-shot distillation of CLIP image encoders from cached teacher embeddings.

The package layout follows the data flow:
sources (images) -> teachers -> store (Zarr embeddings) -> train (students) -> evaluate / coverage.
"""

__version__ = "0.1.0"

# The paper's teacher, the default wherever a teacher is named; here rather than in zsd.teachers so
# that the CLI starts without importing torch.
DEFAULT_TEACHER = "ViT-B-32"
DEFAULT_PRETRAINED = "datacomp_xl_s13b_b90k"
DEFAULT_CHUNK_ROWS = 512  # store rows per chunk: the unit of writing and resuming
