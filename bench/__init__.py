"""``python -m bench``: tapefit's benchmark (see README, "Performance")."""
