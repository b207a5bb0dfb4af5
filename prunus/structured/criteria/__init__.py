"""Unit criteria, one file each; registered by being here (see :mod:`prunus.structured.registry`)."""
