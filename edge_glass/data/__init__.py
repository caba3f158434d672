"""Raw data sources: the synthetic tri-modal generator, raw WebDataset shards, downloaders."""
