"""Defaults the command line shows in its help; kept apart so `zsd --help` imports neither torch nor zarr."""

DEFAULT_TEACHER = "ViT-B-32"
DEFAULT_PRETRAINED = "datacomp_xl_s13b_b90k"
DEFAULT_CHUNK_ROWS = 512  # store rows per chunk: the unit of writing and resuming
