"""The feature store: manifest, writers, readers and the extraction driver.

    from edge_glass.features import open_store, FeatureLoader
"""

from edge_glass.features.loader import FeatureLoader
from edge_glass.features.store import FeatureSplit, open_store

__all__ = ["FeatureLoader", "FeatureSplit", "open_store"]
