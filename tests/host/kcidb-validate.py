#!/usr/bin/env python3
"""Validate a gracevm kcidb.json against the KCIDB schema with the kcidb-io package.

    kcidb-validate.py FILE

Prints KTAP (one test: the report is valid KCIDB); exits 1 when it is not.
"""
import json
import sys

import kcidb_io


def main() -> int:
    path = sys.argv[1]
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    print("KTAP version 1\n1..1")
    schema = kcidb_io.schema.LATEST
    try:
        schema.validate(data)
    except Exception as e:  # jsonschema's ValidationError, or a version mismatch
        print(f"# {path}: {str(e).splitlines()[0]}")
        print("not ok 1 kcidb_report_valid")
        return 1
    counts = {k: len(data.get(k, [])) for k in ("checkouts", "builds", "tests")}
    print(f"# {path}: KCIDB v{schema.major}.{schema.minor}: {counts}")
    print("ok 1 kcidb_report_valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
