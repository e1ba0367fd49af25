"""From raw text to tokenized WebDataset shards. Imports neither model/ nor pipeline/."""
