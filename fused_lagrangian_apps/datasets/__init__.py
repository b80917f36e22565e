"""Data sets for constrained training: UCI Adult and a scalable synthetic generator.

Both return features, 0/1 labels and dense int64 intersectional group ids,
the inputs the per-group constraints are defined over.
"""

from .adult import AdultData, load_adult
from .synthetic import SyntheticData, make_synthetic

__all__ = ["AdultData", "SyntheticData", "load_adult", "make_synthetic"]
