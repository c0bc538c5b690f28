"""Data formats, example parsing, text rendering and dataset loading."""
