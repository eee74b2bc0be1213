"""Converters between m2train models and other checkpoint layouts (the reference M2-BERT release)."""

from .m2_bert import (ConversionError, from_reference_state_dict, import_m2_bert, infer_config,
                      load_reference_checkpoint, reference_config_dict, to_reference_state_dict,
                      write_reference_checkpoint)

__all__ = ["ConversionError", "from_reference_state_dict", "import_m2_bert", "infer_config",
           "load_reference_checkpoint", "reference_config_dict", "to_reference_state_dict",
           "write_reference_checkpoint"]
