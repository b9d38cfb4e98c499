"""Data: embedded digits, shifts, full-scale loaders, and stream protocols."""
