"""Export: a trained model as an open_clip or Hugging Face ``transformers`` CLIP folder, with a model card.

from mmtard.export import export_model

export_model("ViT-L-14-336", "runs/paper/mmt-ard-vit-l14-336", "exports/robust-l14-336", format="hf")
"""

from mmtard.export.card import read_results, render_card
from mmtard.export.exporter import FORMATS, ExportFormat, export_model, list_formats
from mmtard.export.hf import check_hf_convertible, convert_state_dict, hf_config_dict, image_processor_config

__all__ = [
    "ExportFormat",
    "FORMATS",
    "check_hf_convertible",
    "convert_state_dict",
    "export_model",
    "hf_config_dict",
    "image_processor_config",
    "list_formats",
    "read_results",
    "render_card",
]
