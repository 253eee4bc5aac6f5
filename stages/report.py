"""Stage: aggregate every student run into one table (and figures) the thesis is judged by."""

import pandas as pd

from pipeline.config import ReportConfig
from pipeline.report import make_report


def run(cfg: ReportConfig) -> pd.DataFrame:
    return make_report(cfg)
