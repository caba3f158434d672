"""Frozen CLIP / Whisper / Sentence-BERT feature extractors (offline stage only)."""
