"""Kueue objects checked as Kueue v1beta1 and Kubernetes would validate them: API
versions and kinds, object names (DNS-1123 labels or subdomains), quantities,
resource groups (each flavor lists every covered resource, in order; no resource
or flavor in two groups), and references between objects resolved."""

from __future__ import annotations

import re
from typing import Any, Final

KUEUE_API: Final = "kueue.x-k8s.io/v1beta1"
#: DNS-1123 label and subdomain, as Kubernetes validates object names
LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
SUBDOMAIN: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
#: a Kubernetes quantity (no exponents: resctl never writes them)
QUANTITY: Final = re.compile(r"\d+(\.\d+)?(m|Ki|Mi|Gi|Ti|Pi|Ei)?")


def objects_by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        meta = doc["metadata"]
        key = f"{meta.get('namespace', '')}/{meta['name']}".lstrip("/")
        assert key not in found.get(doc["kind"], {}), key
        found.setdefault(doc["kind"], {})[key] = doc
    return found


def check_kueue(docs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every object as Kueue v1beta1 and Kubernetes validate it, and references
    between them resolved."""
    by_kind = objects_by_kind(docs)
    assert set(by_kind) <= {
        "ResourceFlavor",
        "WorkloadPriorityClass",
        "Namespace",
        "ClusterQueue",
        "LocalQueue",
    }
    for doc in docs:
        assert doc["apiVersion"] == ("v1" if doc["kind"] == "Namespace" else KUEUE_API)
        name = doc["metadata"]["name"]
        assert (LABEL if doc["kind"] in ("Namespace", "LocalQueue") else SUBDOMAIN).fullmatch(
            name
        ), name
    for pc in by_kind.get("WorkloadPriorityClass", {}).values():
        assert isinstance(pc["value"], int)
    flavors = by_kind.get("ResourceFlavor", {})
    for cq in by_kind.get("ClusterQueue", {}).values():
        spec = cq["spec"]
        assert SUBDOMAIN.fullmatch(spec["cohort"])
        assert isinstance(spec["namespaceSelector"], dict)
        seen_resources: set[str] = set()
        seen_flavors: set[str] = set()
        for group in spec.get("resourceGroups", []):
            covered = group["coveredResources"]
            assert not seen_resources & set(covered), "a resource in two groups"
            seen_resources |= set(covered)
            for flavor in group["flavors"]:
                assert flavor["name"] in flavors and flavor["name"] not in seen_flavors
                seen_flavors.add(flavor["name"])
                assert [r["name"] for r in flavor["resources"]] == covered
                for quota in flavor["resources"]:
                    assert set(quota) <= {"name", "nominalQuota", "borrowingLimit"}
                    for key in ("nominalQuota", "borrowingLimit"):
                        if key in quota:
                            assert QUANTITY.fullmatch(str(quota[key])), quota
        preemption = spec["preemption"]
        assert preemption["reclaimWithinCohort"] in ("Never", "LowerPriority", "Any")
        assert preemption["withinClusterQueue"] in ("Never", "LowerPriority")
    for lq in by_kind.get("LocalQueue", {}).values():
        assert lq["metadata"]["namespace"] in by_kind["Namespace"]
        assert lq["spec"]["clusterQueue"] in by_kind["ClusterQueue"]
    return by_kind


def quotas_of(cq: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(flavor, resource) → its quota map."""
    return {
        (flavor["name"], r["name"]): r
        for group in cq["spec"]["resourceGroups"]
        for flavor in group["flavors"]
        for r in flavor["resources"]
    }
