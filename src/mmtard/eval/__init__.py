"""Zero-shot evaluation over datasets, results files and reports."""

from mmtard.eval.report import markdown_table, robust_column, write_results
from mmtard.eval.zeroshot import EvalResult, evaluate_classifier

__all__ = ["EvalResult", "evaluate_classifier", "markdown_table", "robust_column", "write_results"]
