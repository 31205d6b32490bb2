"""Session-wide model fixtures (owned by the builders work; see builders/export.py)."""
