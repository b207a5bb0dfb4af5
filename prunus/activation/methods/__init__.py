"""Activation methods, one file each (registered by being here): ``teal``, ``wina``, ``uniform``."""
