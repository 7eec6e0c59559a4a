"""Validates Kubernetes objects offline, before anything reaches a cluster.

Reads a JSON array of objects (from the file named on the command line, or from stdin when the
argument is "-" or absent). Objects of the keda.sh group are checked against Mira's own schema
(keda-<version>.schema.json beside this file, written from KEDA's documentation); every other
object against the Kubernetes OpenAPI schemas that kubernetes-validate bundles, in strict mode
(so an unknown or misspelt field fails, not only a wrong type). No network is used.

Prints a JSON array of problems, each "Kind/name: path: message". A problem is data, not a
failure of this script: it exits 0 whenever it could run, and non-zero only when it could not
(unreadable input, an unknown Kubernetes version).
"""

import argparse
import json
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate

KEDA_VERSION = "2.20"
# The newest Kubernetes whose schemas kubernetes-validate 1.37.0 bundles.
KUBERNETES_VERSION = "1.37.0"
KEDA_SCHEMA = Path(__file__).with_name(f"keda-{KEDA_VERSION}.schema.json")


def where(path) -> str:
    """spec.triggers[0].metadata, from jsonschema's deque of keys and indices."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def explain(error: jsonschema.ValidationError) -> str:
    # A field the schema refuses outright is written `{"not": {}, "description": why}`.
    message = f"{error.instance!r} is not allowed here" if error.validator == "not" else error.message
    why = error.schema.get("description") if isinstance(error.schema, dict) else None
    return f"{message} ({why})" if why else message


def problems_of(obj, keda: jsonschema.Draft202012Validator, kubernetes_version: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"?: (root): not an object: {obj!r}"]
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    who = f"{obj.get('kind', '?')}/{meta.get('name', '?')}"
    api_version = obj.get("apiVersion")
    if not isinstance(api_version, str) or not isinstance(obj.get("kind"), str):
        return [f"{who}: (root): apiVersion and kind must both be strings"]
    if api_version.startswith("keda.sh/"):
        errors = sorted(keda.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
        return [f"{who}: {where(e.absolute_path)}: {explain(e)}" for e in errors]
    try:
        kubernetes_validate.validate(obj, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{who}: {where(e.absolute_path)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{who}: (root): {e.message}"]
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("objects", nargs="?", default="-", help="JSON file holding an array of objects; - for stdin")
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    args = parser.parse_args()

    text = sys.stdin.read() if args.objects == "-" else Path(args.objects).read_text()
    objects = json.loads(text)
    if not isinstance(objects, list):
        sys.exit("validate.py: expected a JSON array of Kubernetes objects")
    if kubernetes_validate.utils.major_minor(args.kubernetes_version.lstrip("v")) not in {
        kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()
    }:
        sys.exit(f"validate.py: kubernetes-validate has no schemas for Kubernetes {args.kubernetes_version}")

    schema = json.loads(KEDA_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    keda = jsonschema.Draft202012Validator(schema)
    problems = [p for obj in objects for p in problems_of(obj, keda, args.kubernetes_version)]
    # Two rules can say the same thing (every metadata value is a string; queueLength is one).
    problems = list(dict.fromkeys(problems))
    json.dump(problems, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
