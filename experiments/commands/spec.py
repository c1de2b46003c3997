"""`ept-hw spec export|validate`: the device specification for hardware collaborators."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "spec",
        help="export or validate a device specification (device_spec.json, device_spec.md, PDF)",
        description="Device specification for hardware collaborators: from a compare run (runs/NAME) or a sweep "
        "directory (runs/sweep), write device_spec.json (validated against the shipped JSON Schema), "
        "device_spec.md with plots and, with --pdf, device_spec.pdf.",
    )
    sub = p.add_subparsers(dest="spec_command", metavar="ACTION")
    e = sub.add_parser("export", help="write device_spec.json/.md (and .pdf) from a run or sweep directory")
    e.add_argument("source", help="runs/NAME (a compare run) or runs/sweep (a sweep directory)")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--pdf", action="store_true", help="also write device_spec.pdf")
    e.add_argument("--tolerance", type=float, help="gap tolerance for the requirements [nats] (default: the sweep's)")
    e.add_argument("--no-pulse-response", action="store_true", help="skip the pulse-response simulation and plot")
    e.add_argument("--json", action="store_true", help="print a JSON summary (files, requirements) instead of text")
    e.set_defaults(func=_export)
    v = sub.add_parser("validate", help="check a device_spec.json against the schema")
    v.add_argument("file")
    v.set_defaults(func=_validate)
    s = sub.add_parser("schema", help="print the JSON Schema")
    s.set_defaults(func=_schema)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _export(args: argparse.Namespace) -> int:
    from experiments.spec import export_spec

    result = export_spec(args.source, args.out, pdf=args.pdf, tolerance=args.tolerance,
                         pulse_response=not args.no_pulse_response)
    if args.json:
        print(json.dumps({"spec": str(result.spec_path), "markdown": str(result.markdown_path),
                          "pdf": None if result.pdf_path is None else str(result.pdf_path),
                          "plots": [str(p) for p in result.plots], "schema_version": result.spec["schema_version"],
                          "requirements": [{k: r.get(k) for k in ("axis", "required", "unit", "status", "interval",
                                                                   "seeds", "steps", "how")}
                                           for r in result.spec["requirements"]["rows"]]}))
        return 0
    print(f"device spec: {result.spec_path} (schema {result.spec['schema_version']}, validated)")
    print(f"datasheet: {result.markdown_path}")
    if result.pdf_path is not None:
        print(f"pdf: {result.pdf_path}")
    for row in result.spec["requirements"]["rows"]:
        print(f"  requires {row['axis']}: {row['required']} [{row['unit']}] ({row['status']}): {row.get('how', '')}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from experiments.spec import validate_spec

    path = Path(args.file)
    if path.is_dir():
        raise ValueError(f"{path} is a directory: give the device_spec.json file inside it"
                         + (f" ({path / 'device_spec.json'})" if (path / "device_spec.json").is_file() else ""))
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise ValueError(f"{path} is JSON but not a device spec (a {type(spec).__name__}, not an object)")
    validate_spec(spec)
    print(f"{path}: valid device spec (schema {spec['schema_version']})")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from experiments.spec import load_schema

    print(json.dumps(load_schema(), indent=2))
    return 0
