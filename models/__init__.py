"""Model registry: `create_model(name, num_classes, pretrained=None)` over torchvision and our own nets."""
from models.registry import (LOCAL_MODELS, ModelError, classifier_name, create_model, list_models, load_pretrained,
                             read_state_dict)

__all__ = ["LOCAL_MODELS", "ModelError", "classifier_name", "create_model", "list_models", "load_pretrained",
           "read_state_dict"]
