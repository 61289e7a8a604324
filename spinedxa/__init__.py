"""spinedxa: a reproducible pipeline from raw spine DXA scans to five CNN osteoporosis classifiers."""

__version__ = "0.1.0"
