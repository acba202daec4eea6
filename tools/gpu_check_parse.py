"""Reading the steps' output for ``tools/gpu_check.py``: numbers, test reports, the error to show.

Every function takes text (or a file) and returns plain values; none runs anything.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

_NUMBER = r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_UNITS = r"tokens/s|TFLOP/s|GB/s|GiB|ms"
_VARIANT_ROW = re.compile(rf"^(?P<name>[a-z][\w +-]*?)\s+(?P<wall>{_NUMBER})\s+(?P<cpu>{_NUMBER})\s+(?P<peak>{_NUMBER})$")
_RATIO_ROW = re.compile(rf"^(?P<a>.+?) / (?P<b>.+?)\s+(?P<wall>{_NUMBER})x\s+(?P<cpu>{_NUMBER})x$")
_COPY = re.compile(rf"^copy bandwidth (?P<gbps>{_NUMBER}) GB/s")
_EFFECTIVE = re.compile(rf"^(?P<name>.+?)\s+(?P<gbps>{_NUMBER}) GB/s effective,\s*(?P<floor>{_NUMBER})x floor")
_VALUE_THEN_UNIT = re.compile(rf"(?P<label>[A-Za-z][\w .+-]*?)[\s:=]+(?P<value>{_NUMBER})\s*(?P<unit>{_UNITS})(?![\w/])")
_UNIT_THEN_VALUE = re.compile(rf"^(?P<label>[A-Za-z][\w .+-]*?)\s+(?P<unit>{_UNITS})\s*[:=]?\s*(?P<value>{_NUMBER})\b")


def slug(text: str) -> str:
    """``"mrl logprobs"`` -> ``"mrl_logprobs"``, ``"TFLOP/s"`` -> ``"tflop_s"``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def parse_summary_line(output: str) -> dict | None:
    """The JSON object of the last ``SUMMARY {...}`` line, or None."""
    for line in reversed(output.splitlines()):
        if line.startswith("SUMMARY "):
            try:
                value = json.loads(line[len("SUMMARY "):])
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None


def parse_vocab_ops(output: str) -> dict:
    """Numbers of ``tools/bench_vocab_ops.py``: per-variant times and peaks, ratios, the floor."""
    numbers: dict[str, float] = {}
    for line in output.splitlines():
        line = line.strip()
        if match := _COPY.match(line):
            numbers["copy_gbps"] = float(match["gbps"])
        elif match := _EFFECTIVE.match(line):
            name = slug(match["name"])
            numbers[f"{name}_gbps"] = float(match["gbps"])
            numbers[f"{name}_x_floor"] = float(match["floor"])
        elif match := _RATIO_ROW.match(line):
            key = f"ratio_{slug(match['a'])}_vs_{slug(match['b'])}"
            numbers[f"{key}_wall"] = float(match["wall"])
            numbers[f"{key}_cpu"] = float(match["cpu"])
        elif match := _VARIANT_ROW.match(line):
            name = slug(match["name"])
            numbers[f"{name}_wall_ms"] = float(match["wall"])
            numbers[f"{name}_cpu_ms"] = float(match["cpu"])
            numbers[f"{name}_peak_extra_shards"] = float(match["peak"])
    return numbers


def parse_unit_numbers(output: str) -> dict:
    """Best effort for a benchmark without a SUMMARY line: ``label value unit`` / ``label unit value``."""
    numbers: dict[str, float] = {}
    for line in output.splitlines():
        line = line.strip()
        match = _UNIT_THEN_VALUE.match(line) or _VALUE_THEN_UNIT.search(line)
        if match:
            numbers[slug(f"{match['label']} {match['unit']}")] = float(match["value"])
    return numbers


def junit_outcome(path: Path) -> tuple[dict | None, list[dict]]:
    """Counts and per-test status from a pytest JUnit XML report; (None, []) when there is none."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None, []
    tests = []
    for case in root.iter("testcase"):
        status, reason = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = {"failure": "failed"}.get(child.tag, child.tag)
                reason = _first_line(child.get("message") or child.text or "")
                break
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        tests.append({"id": test_id, "status": status, "reason": reason,
                      "seconds": float(case.get("time") or 0.0)})
    count = lambda status: sum(t["status"] == status for t in tests)  # noqa: E731
    numbers = {"tests": len(tests), "passed": count("passed"), "failed": count("failed"),
               "errors": count("error"), "skipped": count("skipped")}
    return numbers, tests


def _first_line(text: str) -> str:
    text = re.sub(r"^Skipped: ", "", text.strip())
    return text.splitlines()[0][:300] if text else ""


def last_error_line(output: str) -> str:
    """The line that best says why a command failed: the last one naming an error, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith("$ ")]
    if not lines:
        return "no output"
    for line in reversed(lines):
        if re.search(r"(Error|Exception|error:|Killed|Traceback)", line):
            return line[:300]
    return lines[-1][:300]
