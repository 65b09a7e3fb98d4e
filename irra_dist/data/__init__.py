"""Data: annotation parsers, WebDataset shards (format, builder, readers) and the loaders over them."""
