"""Importable runners behind the experiment binaries (notebooks call them)."""
