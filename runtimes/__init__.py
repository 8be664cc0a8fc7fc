"""Runtimes: one module per backend behind one small interface."""
