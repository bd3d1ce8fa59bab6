"""Hydra configs of the sim CLIs (a package, so that installed and editable copies find them)."""
