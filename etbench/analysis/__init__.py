"""Read etbench runs from MLflow and turn them into statistics, tables and figures."""

from etbench.errors import EtbenchError


class AnalysisError(EtbenchError, ValueError):
    """The report cannot be made as asked: the experiment, its runs or a metric named is not in the store."""
