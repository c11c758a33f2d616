"""JSON Schemas of felixscan's machine-readable outputs, shipped as package data.

`scan-result.schema.json`: the document `felixscan scan --format json` prints and
`felixscan report --format json` writes (`reports.outputs.schema()` loads it).
"""
