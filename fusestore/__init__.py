"""fusestore: a FUSE filesystem that stages, validates, backs up and atomically commits every write."""

__version__ = "0.1.0"
