"""Kubeflow components of the H-JEPA pipeline (a repo-level module, not installed)."""
