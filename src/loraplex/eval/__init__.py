"""Evaluation outputs: reports (HTML + Markdown) and their figures over run directories."""

from .report import NotARunDirError, Run, load_run, write_report

__all__ = ["NotARunDirError", "Run", "load_run", "write_report"]
