"""Data: prompt templates, Dolly-format instruction data and plain-text continuation data."""
