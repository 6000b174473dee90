"""Cell-type annotation with a PEFT-adapted frozen backbone (scPEFT's task), and attention-based
gene ranking: the project's second product, on the same backbone and PEFT layers (`scdca.nn`)."""

from scdca.annotation.annotator import Annotator, expression, write_explanation
from scdca.annotation.config import AnnotateConfig

__all__ = ["AnnotateConfig", "Annotator", "expression", "write_explanation"]
