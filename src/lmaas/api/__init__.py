"""lmaas.api: the HTTP adapters (OpenAI, Open Inference Protocol v2) over the engine seam."""

from lmaas.api.app import create_app
from lmaas.api.services import ApiConfig, ApiServices, DefaultApiConfig

__all__ = ["ApiConfig", "ApiServices", "DefaultApiConfig", "create_app"]
