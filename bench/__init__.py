"""The benchmark scripts (run each as ``python bench/X.py``); ``_common`` holds what they share."""
