"""Data: annotation parsers, the synthetic demo dataset, WebDataset shards and the loaders over them."""
