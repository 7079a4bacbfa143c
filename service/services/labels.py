"""Kubernetes labels and label selectors (equality-based: `a=b`, `a==b`, `a!=b`, `a`, `!a`, comma = AND)."""

from __future__ import annotations

import re

from service.services.errors import Invalid

MAX_LABELS = 64
_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def key_error(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"label key {key!r}: the prefix must be a DNS subdomain (lowercase, at most 253 characters)"
    if not _NAME.match(name):
        return (f"label key {key!r}: the name must be 1-63 characters, alphanumeric at both ends, with - _ . "
                "between")
    return None


def value_error(key: str, value: object) -> str | None:
    if not isinstance(value, str):
        return f"label {key!r}: the value must be a string"
    if value and not _NAME.match(value):
        return (f"label {key!r}: value {value!r} must be empty or 1-63 characters, alphanumeric at both ends, "
                "with - _ . between")
    return None


def validate(labels: dict) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise Invalid(f"{len(labels)} labels; at most {MAX_LABELS}")
    for key, value in labels.items():
        if error := key_error(key) or value_error(key, value):
            raise Invalid(error)
    return dict(labels)


Requirement = tuple[str, str, str | None]  # (op, key, value): op in =, !=, exists, !exists


def parse_selector(text: str) -> list[Requirement]:
    """kubectl's equality-based selector; a bad one is one clear Invalid."""
    requirements: list[Requirement] = []
    for term in (t.strip() for t in text.split(",")):
        if not term:
            continue
        if "!=" in term:
            key, _, value = term.partition("!=")
            op = "!="
        elif "=" in term:
            key, _, value = term.partition("==") if "==" in term else term.partition("=")
            op = "="
        elif term.startswith("!"):
            key, value, op = term[1:], "", "!exists"
        else:
            key, value, op = term, "", "exists"
        key, value = key.strip(), value.strip()
        if " in " in term or " notin " in term or "(" in term:
            raise Invalid(f"label selector term {term!r}: set-based selectors (in, notin) are not supported; use "
                          "key=value, key!=value, key or !key, joined by commas")
        if error := key_error(key) or (value_error(key, value) if op in ("=", "!=") else None):
            raise Invalid(f"bad label selector {text!r}: {error}")
        requirements.append((op, key, value if op in ("=", "!=") else None))
    return requirements


def matches(requirements: list[Requirement], labels: dict | None) -> bool:
    labels = labels or {}
    for op, key, value in requirements:
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:  # kubectl: a missing key satisfies !=
            return False
        if op == "exists" and key not in labels:
            return False
        if op == "!exists" and key in labels:
            return False
    return True
