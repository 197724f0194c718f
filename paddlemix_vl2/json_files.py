"""Reading the JSON files of checkpoints, processors, adapters and trainer states with one-line errors."""
from __future__ import annotations

import json
from typing import Any, Dict, Type

__all__ = ["read_json_object"]


def read_json_object(path: str, error: Type[Exception], fix: str) -> Dict[str, Any]:
    """The JSON object in the file ``path``. Invalid JSON, or JSON that is not an object, raises
    ``error`` with a message that names the file and ends with ``fix`` (what the user should do)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}; {fix}")
    return data
