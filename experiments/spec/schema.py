"""The device spec's JSON Schema (`experiments/spec_schema.json`, package data) and validation."""

from __future__ import annotations

import importlib.resources
import json
from typing import Any, Mapping

__all__ = ["SCHEMA_VERSION", "SCHEMA_FILE", "SpecValidationError", "load_schema", "validate_spec"]

SCHEMA_VERSION = "1.1.0"
SCHEMA_FILE = "spec_schema.json"


class SpecValidationError(ValueError):
    """An export that does not satisfy `spec_schema.json`; the message gives the JSON path."""


def load_schema() -> dict[str, Any]:
    """The JSON Schema shipped with the package (`experiments/spec_schema.json`)."""
    text = importlib.resources.files("experiments").joinpath(SCHEMA_FILE).read_text()
    return json.loads(text)


def validate_spec(spec: Mapping[str, Any]) -> None:
    """Raise `SpecValidationError` (naming the JSON path and the rule) unless `spec` fits the schema."""
    import jsonschema

    schema = load_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(spec), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise SpecValidationError(f"device spec does not match schema {SCHEMA_VERSION} at {where}: {first.message}{more}")

