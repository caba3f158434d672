"""Trainable modules: projectors, pooling, Perceiver resampler, MRL heads, fusion, losses."""
