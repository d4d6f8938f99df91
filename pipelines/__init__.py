"""The H-JEPA Kubeflow pipeline and its compiled YAML (a repo-level module, not installed)."""
