"""Infer tasks of the IBISAgent MONAI Label app."""
