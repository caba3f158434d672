"""The feature store: manifest, writers, readers and the extraction driver."""
