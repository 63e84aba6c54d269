"""Images sent inline in OpenAI-style requests: ``data:image/...;base64,...`` URLs.

The server never fetches a remote URL (no outbound requests on a client's behalf, no SSRF):
``http(s)://`` image URLs are refused with a 400 that says how to send the image instead. The
bytes are decoded here and checked to be base64 of an ``image/*`` media type; whether they are a
readable image is the worker's call (its decoder answers 400 for a corrupt file).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

from lmaas.api.openai.base import OpenAIBaseModel
from lmaas.core.errors import InvalidRequestError

_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")
_WHITESPACE = re.compile(r"\s+")
HOW_TO_SEND = "send the image inline as a data:image/<type>;base64,<data> URL"


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="allow")

    url: str


class ImageContent(OpenAIBaseModel):
    """An OpenAI content part: ``{"type": "image_url", "image_url": {"url": "data:..."}}``."""

    type: Literal["image_url"]
    image_url: ImageUrl | str


def image_url_of(item: ImageContent) -> str:
    return item.image_url if isinstance(item.image_url, str) else item.image_url.url


def is_image_data_url(value: str) -> bool:
    """True for strings that look like ``data:image/...`` URLs (to refuse them for text models)."""
    return value[:11].lower() == "data:image/"


def decode_image_url(url: str, param: str) -> bytes:
    """The image bytes of a base64 ``data:image/...`` URL.

    Args:
        url: The URL as the client sent it.
        param: The request parameter it came from, for the error.

    Raises:
        InvalidRequestError: a remote URL, another scheme, a media type other than ``image/*``,
            a URL that is not base64, bad base64, or no data.
    """
    lowered = url[:8].lower()
    if lowered.startswith(("http://", "https://")):
        raise InvalidRequestError(
            f"'{param}' is a remote URL; the server does not fetch images: {HOW_TO_SEND}",
            param=param,
        )
    if not lowered.startswith("data:"):
        raise InvalidRequestError(f"'{param}' is not an image: {HOW_TO_SEND}", param=param)
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise InvalidRequestError(f"'{param}' is a malformed data URL (no ',')", param=param)
    media_type, *options = header.split(";")
    if not _MEDIA_TYPE.fullmatch(media_type) or not media_type.lower().startswith("image/"):
        shown = media_type[:64] or "none"
        raise InvalidRequestError(
            f"'{param}' is a data URL of media type {shown!r}, not an image: {HOW_TO_SEND}",
            param=param,
        )
    if "base64" not in (o.strip().lower() for o in options):
        raise InvalidRequestError(f"'{param}' must be base64-encoded: {HOW_TO_SEND}", param=param)
    try:
        data = base64.b64decode(_WHITESPACE.sub("", payload), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"'{param}' holds invalid base64 data", param=param) from None
    if not data:
        raise InvalidRequestError(f"'{param}' holds no image data", param=param)
    return data
