"""Ablation reports: a sweep read back from MLflow, as tables, plots, HTML and Markdown."""

from cnnlab.report.build import build_report
from cnnlab.report.collect import Sweep, load_sweep

__all__ = ["Sweep", "build_report", "load_sweep"]
