"""Rich tool results: text, images, audio, embedded resources and resource links, through the queue.

A handler returns one of the helpers below (each is the ``mcp`` SDK's own content type, with a constructor that
takes what an author has: bytes are base64-encoded for them), a list of them, or a ``ToolResult`` that adds
structured content::

    @toolset.tool
    async def chart(city: str) -> Image:
        \"\"\"A chart of the week's temperatures in a city, as a PNG image.\"\"\"
        return Image(render(city), mime_type="image/png")

On the queue a rich result is a JSON object holding the reserved key ``CONTENT_KEY`` (a plain result that holds
it travels as a rich result whose structured content is the plain result, so nothing is taken for what it is
not). The gateway reads it as hostile input from the worker role (``call_result``): every block is rebuilt from
the fields MCP defines, each checked (mime types, base64, URIs, counts); anything else is a clear tool error,
never a crash. Sizes are bounded by the database like any result (``max_payload_bytes``, ``max_json_depth``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

from mcp.types import (
    Annotations,
    AudioContent,
    BlobResourceContents,
    CallToolResult,
    ContentBlock,
    EmbeddedResource,
    ImageContent,
    TextContent,
    TextResourceContents,
)
from mcp.types import ResourceLink as _SdkResourceLink
from pydantic import BaseModel, ConfigDict

from ._common import CONTENT_KEY, JSON, clip

STRUCTURED_KEY = "$mcp_structured"
MAX_BLOCKS = 100
"""Content blocks in one result."""
MAX_URI_CHARS = 2048
MAX_NAME_CHARS = 1000
_MIME = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$", re.IGNORECASE)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]{0,31}:[^\s\x00-\x1f\x7f]*$")
_CONTENT_TYPES = (TextContent, ImageContent, AudioContent, EmbeddedResource, _SdkResourceLink)


def _base64(data: bytes | str) -> str:
    return base64.b64encode(data).decode("ascii") if isinstance(data, bytes) else data


class Text(TextContent):
    """A text block: ``Text("Done: 3 rows")``."""

    def __init__(self, text: str, **fields: Any) -> None:
        super().__init__(text=text, **fields)


class Image(ImageContent):
    """An image: ``Image(png_bytes, mime_type="image/png")`` (bytes, or a base64 string)."""

    def __init__(self, data: bytes | str, mime_type: str, **fields: Any) -> None:
        super().__init__(data=_base64(data), mime_type=mime_type, **fields)


class Audio(AudioContent):
    """A sound: ``Audio(wav_bytes, mime_type="audio/wav")`` (bytes, or a base64 string)."""

    def __init__(self, data: bytes | str, mime_type: str, **fields: Any) -> None:
        super().__init__(data=_base64(data), mime_type=mime_type, **fields)


class Resource(EmbeddedResource):
    """A resource embedded in the result: its URI and either ``text`` or ``data`` (bytes, or a base64 string).
    ``Resource("file:///report.csv", text=csv, mime_type="text/csv")``."""

    def __init__(self, uri: str, *, text: str | None = None, data: bytes | str | None = None,
                 mime_type: str | None = None, **fields: Any) -> None:
        if (text is None) == (data is None):
            raise ValueError("a Resource holds either text or data")
        contents: TextResourceContents | BlobResourceContents = (
            TextResourceContents(uri=uri, mime_type=mime_type, text=text) if text is not None
            else BlobResourceContents(uri=uri, mime_type=mime_type, blob=_base64(data or b"")))
        super().__init__(type="resource", resource=contents, **fields)


class ResourceLink(_SdkResourceLink):
    """A link to a resource the client may read: ``ResourceLink("file:///report.csv", name="report.csv")``."""

    def __init__(self, uri: str, name: str, **fields: Any) -> None:
        super().__init__(uri=uri, name=name, **fields)


class ToolResult(BaseModel):
    """Content blocks, and structured content beside them (a JSON object; sent without an output schema)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    content: list[ContentBlock]
    structured: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------------ worker side
def is_content_annotation(annotation: Any) -> bool:
    """Whether a return annotation names content (then the tool declares no output schema)."""
    if isinstance(annotation, type) and issubclass(annotation, (*_CONTENT_TYPES, ToolResult)):
        return True
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, Sequence, typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a not in (type(None), Ellipsis)]
        return bool(args) and all(is_content_annotation(a) for a in args)
    return False


def _is_block(value: Any) -> bool:
    return isinstance(value, _CONTENT_TYPES)


def encode(value: Any) -> dict[str, JSON] | None:
    """A handler's return value as a rich result on the queue; None when it is not content."""
    if isinstance(value, ToolResult):
        blocks, structured = value.content, value.structured
    elif _is_block(value):
        blocks, structured = [value], None
    elif isinstance(value, (list, tuple)) and value and all(_is_block(v) for v in value):
        blocks, structured = list(value), None
    else:
        return None
    encoded: dict[str, JSON] = {CONTENT_KEY: [b.model_dump(by_alias=True, mode="json", exclude_none=True)
                                              for b in blocks]}
    if structured is not None:
        encoded[STRUCTURED_KEY] = json.loads(json.dumps(structured))
    return encoded


def escape(result: dict[str, JSON]) -> dict[str, JSON]:
    """A plain result that holds the reserved key travels as a rich one: its text, and itself as structured."""
    if CONTENT_KEY not in result:
        return result
    return {CONTENT_KEY: [{"type": "text", "text": _pretty(result)}], STRUCTURED_KEY: result}


# ----------------------------------------------------------------------------------------------- gateway side
class Malformed(ValueError):
    """A result from the queue that is no valid MCP content; the message says what is wrong."""


def _pretty(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2)


def call_result(result: dict[str, JSON]) -> CallToolResult:
    """A worker's result as the agent gets it: a plain result as JSON text with structured content, a rich result
    as its checked content blocks. A malformed answer becomes a tool error that says so."""
    try:
        if CONTENT_KEY not in result:
            return CallToolResult(content=[TextContent(text=_pretty(result))], structured_content=result)
        return _rich(result)
    except Malformed as exc:
        return _refused(str(exc))
    except (TypeError, ValueError, RecursionError):  # an answer written by hand that Python cannot read back
        return _refused("it is not plain JSON")


def _refused(why: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(text=(
        f"The tool's answer could not be used ({clip(why, 300)}). Tell the user the tool service returned a "
        "malformed answer."))], is_error=True)


def _rich(result: dict[str, JSON]) -> CallToolResult:
    raw = result[CONTENT_KEY]
    structured = result.get(STRUCTURED_KEY)
    if not isinstance(raw, list) or not raw:
        raise Malformed("its content is not a list of blocks")
    if len(raw) > MAX_BLOCKS:
        raise Malformed(f"it has {len(raw)} content blocks; at most {MAX_BLOCKS} are accepted")
    if structured is not None and not isinstance(structured, dict):
        raise Malformed("its structured content is not a JSON object")
    blocks = [_block(i, b) for i, b in enumerate(raw)]
    return CallToolResult(content=blocks, structured_content=structured)


def _block(index: int, raw: Any) -> ContentBlock:
    where = f"content block {index}"
    if not isinstance(raw, dict):
        raise Malformed(f"{where} is not an object")
    kind = raw.get("type")
    annotations = _annotations(where, raw.get("annotations"))
    if kind == "text":
        return TextContent(text=_string(where, raw, "text"), annotations=annotations)
    if kind in ("image", "audio"):
        media = _mime(where, raw.get("mimeType"), required=True, family=kind) or ""
        data = _b64(where, raw.get("data"))
        cls = ImageContent if kind == "image" else AudioContent
        return cls(data=data, mime_type=media, annotations=annotations)
    if kind == "resource":
        res = raw.get("resource")
        if not isinstance(res, dict):
            raise Malformed(f"{where}: an embedded resource needs a resource object")
        uri = _uri(where, res.get("uri"))
        mime = _mime(where, res.get("mimeType"))
        has_text, has_blob = "text" in res, "blob" in res
        if has_text == has_blob:
            raise Malformed(f"{where}: an embedded resource holds either text or blob")
        contents: TextResourceContents | BlobResourceContents = (
            TextResourceContents(uri=uri, mime_type=mime, text=_string(where, res, "text")) if has_text
            else BlobResourceContents(uri=uri, mime_type=mime, blob=_b64(where, res.get("blob"))))
        return EmbeddedResource(type="resource", resource=contents, annotations=annotations)
    if kind == "resource_link":
        size = raw.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**63):
            raise Malformed(f"{where}: size is not a byte count")
        return _SdkResourceLink(  # icons are left out: a host would fetch them from wherever the worker says
            uri=_uri(where, raw.get("uri")), name=_string(where, raw, "name", MAX_NAME_CHARS, empty=False),
            title=_optional(where, raw, "title"), description=_optional(where, raw, "description", 10_000),
            mime_type=_mime(where, raw.get("mimeType")), size=size, annotations=annotations)
    raise Malformed(f"{where} has an unknown type {clip(str(kind), 40)!r}")


def _string(where: str, raw: dict[str, Any], key: str, limit: int | None = None, *, empty: bool = True) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or (not empty and not value):
        raise Malformed(f"{where}: {key} is not a{'' if empty else ' non-empty'} string")
    if limit is not None and len(value) > limit:
        raise Malformed(f"{where}: {key} is longer than {limit} characters")
    return value


def _optional(where: str, raw: dict[str, Any], key: str, limit: int = MAX_NAME_CHARS) -> str | None:
    return None if raw.get(key) is None else _string(where, raw, key, limit)


def _mime(where: str, value: Any, *, required: bool = False, family: str | None = None) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not _MIME.fullmatch(value):
        raise Malformed(f"{where}: mimeType is not a media type")
    if family is not None and value.split("/", 1)[0].lower() != family:
        raise Malformed(f"{where}: an {family} needs an {family}/ media type, not {value!r}")
    return value


def _b64(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Malformed(f"{where}: data is not base64 text")
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Malformed(f"{where}: data is not valid base64") from None
    return value


def _uri(where: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_URI_CHARS or not _URI.fullmatch(value):
        raise Malformed(f"{where}: uri is not an absolute URI of at most {MAX_URI_CHARS} characters")
    return value


def _annotations(where: str, value: Any) -> Annotations | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Malformed(f"{where}: annotations is not an object")
    audience, priority, modified = value.get("audience"), value.get("priority"), value.get("lastModified")
    if audience is not None and (not isinstance(audience, list) or len(audience) > 2
                                 or any(a not in ("user", "assistant") for a in audience)):
        raise Malformed(f"{where}: annotations.audience is not a list of 'user' and 'assistant'")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, (int, float))
                                 or not 0 <= priority <= 1):
        raise Malformed(f"{where}: annotations.priority is not a number from 0 to 1")
    if modified is not None and (not isinstance(modified, str) or len(modified) > 64):
        raise Malformed(f"{where}: annotations.lastModified is not a date")
    return Annotations(audience=audience, priority=priority, last_modified=modified)
