"""Curation: which training labels look wrong (label_issues.py), and leaving them out of the next run (exclusion.py)."""
