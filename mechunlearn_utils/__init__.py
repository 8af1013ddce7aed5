"""mechunlearn_utils: the tested library behind the Mechanistic Unlearning Workbook."""
from mechunlearn_utils.core.models import LoadedModel, ModelLoadError, load_model

__all__ = ["LoadedModel", "ModelLoadError", "load_model"]
