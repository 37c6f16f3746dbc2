"""One adapter per public source, each turning its download layout into drop folders:
`chaos` (CHAOS, healthy) and `tcga_lihc` (TCGA-LIHC from TCIA, HCC); `common` holds what they share.

    from hcc_assets.intake.sources import import_chaos, import_tcia
"""

from hcc_assets.intake.sources.chaos import import_chaos
from hcc_assets.intake.sources.common import MASK_PATH, ImportResult
from hcc_assets.intake.sources.tcga_lihc import import_tcia

__all__ = ["MASK_PATH", "ImportResult", "import_chaos", "import_tcia"]
