"""Generic input and output: atomic writes, the cache root, books and text windows, model loading, recipes."""
