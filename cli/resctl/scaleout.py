"""The hand-off when users outgrow one host: resd's pools as Slurm or Kueue config.

Pure renderers from protocol values to text; ``resctl export --format slurm|kueue``
fetches the values and writes the text. ``slurm_config`` turns one pool's
``resources`` view into slurm.conf and gres.conf lines; ``kueue_manifests`` turns
pools and tenants into Kueue objects (YAML): per pool a cohort, a ClusterQueue for
the capacity no tenant is guaranteed, and one per tenant with a quota there (min →
nominalQuota, max − min → borrowingLimit); per tenant a namespace and a LocalQueue
per pool; per priority a WorkloadPriorityClass. docs/scale-out.md gives the whole
mapping and what does not map. Bad input raises InvalidError (exit 2).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import attrs
import yaml

from resctl.options import resource_order
from resd_client.errors import InvalidError
from resd_client.protocol import CPU_LIST, GpuStatus, HostResources, PoolInfo, TenantInfo
from resd_client.quantity import Unit, unit_of

KUEUE_API: Final = "kueue.x-k8s.io/v1beta1"
GPU_RESOURCE: Final = "nvidia.com/gpu"
#: the node label NVIDIA's GPU feature discovery sets to the model, spaces as "-"
GPU_PRODUCT_LABEL: Final = "nvidia.com/gpu.product"
#: the flavor of everything but GPUs (Kueue's docs name theirs so)
DEFAULT_FLAVOR: Final = "default-flavor"
#: the flavor of GPUs whose model resd does not know
UNTYPED_GPU_FLAVOR: Final = "gpu"
#: prefix that makes a custom resd resource a Kubernetes extended resource name
EXTENDED_PREFIX: Final = "resd/"
PRIORITY_CLASS_PREFIX: Final = "resd-priority-"
#: the label Kubernetes gives every namespace, its name
NAMESPACE_LABEL: Final = "kubernetes.io/metadata.name"
#: Kubernetes names of resd's resources; other counted resources get EXTENDED_PREFIX
KUBE_RESOURCES: Final = {
    "cpu": "cpu",
    "memory": "memory",
    "disk": "ephemeral-storage",
    "gpu": GPU_RESOURCE,
}
MIB: Final = 1 << 20
_BINARY_SUFFIXES: Final = (
    ("Ei", 1 << 60),
    ("Pi", 1 << 50),
    ("Ti", 1 << 40),
    ("Gi", 1 << 30),
    ("Mi", 1 << 20),
    ("Ki", 1 << 10),
)

_VENDOR_WORDS: Final = frozenset({"nvidia", "tesla", "geforce", "quadro"})
#: a DNS-1123 label: namespaces, and what Kueue's queue-name label may hold
_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
#: a Kubernetes label value (the GPU product), and the name part of a qualified name
#: (an extended resource): one grammar
_LABEL_VALUE: Final = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
#: a Slurm node name: a host name, nothing hostlist syntax ("[", ",") would expand
SLURM_NODE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,62}[A-Za-z0-9])?")


# ------------------------------------------------------------------- names


def gpu_type(model: str) -> str:
    """The short type of a GPU model, as Slurm GRES types are usually written:
    ``NVIDIA H100 80GB HBM3`` → ``h100``, ``NVIDIA A100-SXM4-80GB`` → ``a100``,
    ``NVIDIA GeForce RTX 4090`` → ``rtx4090``: the words up to the first with a digit,
    less the vendor's brand words. "" for an unknown model."""
    words = [w for w in re.split(r"[^a-z0-9]+", model.lower()) if w and w not in _VENDOR_WORDS]
    end = next((i for i, w in enumerate(words, 1) if any(c.isdigit() for c in w)), len(words))
    return "".join(words[:end])[:63]


def gpu_types(models: Iterable[str]) -> dict[str, str]:
    """Each model's type (``gpu_type``). Models that would share a type (two H100
    variants) keep their whole sanitised name instead, so that a Kueue flavor's node
    label names one product; an unknown model ("") stays ""."""
    short = {model: gpu_type(model) for model in set(models)}
    shared = Counter(short.values())
    return {
        model: kind if not kind or shared[kind] == 1 else _sanitise(model)
        for model, kind in short.items()
    }


def kube_name(name: str) -> str:
    """A resd pool or tenant name as a DNS-1123 label. Names that already are one stay
    as they are; others are lowercased and sanitised, with a short hash of the
    original appended so that ``Alice`` and ``alice`` stay apart."""
    if _LABEL.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:5]
    return f"{_sanitise(name)[:57].rstrip('-')}-{digest}".lstrip("-")


def _sanitise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:63].rstrip("-")


def kube_resource(name: str, kind: str) -> str | None:
    """The Kubernetes resource a resd resource is quota for, or None when there is
    none: bandwidths, ranges (ports) and VRAM slices."""
    if kind in ("range", "slice") or unit_of(name) is Unit.BANDWIDTH:
        return None
    if name in KUBE_RESOURCES:
        return KUBE_RESOURCES[name]
    if unit_of(name) is Unit.COUNT and _LABEL_VALUE.fullmatch(name):
        return EXTENDED_PREFIX + name
    return None


def kube_quantity(resource: str, amount: int) -> str:
    """An internal amount as a Kubernetes quantity: cores (``1500m``), bytes with the
    largest binary suffix that is exact (``80Gi``), or a count."""
    unit = unit_of(resource)
    if unit is Unit.MILLICORES:
        return str(amount // 1000) if amount % 1000 == 0 else f"{amount}m"
    if unit is Unit.BYTES and amount:
        for suffix, size in _BINARY_SUFFIXES:
            if amount % size == 0:
                return f"{amount // size}{suffix}"
    return str(amount)


# ------------------------------------------------------------------- Slurm


@attrs.frozen
class _Gpu:
    """A physical GPU as Slurm sees it: MIG instances (members ``0-mig1``) fold into
    their parent."""

    index: str
    model: str
    numa: str
    mig: bool


def _physical_gpus(gpus: Sequence[GpuStatus]) -> list[_Gpu]:
    by_index: dict[str, list[GpuStatus]] = {}
    for gpu in gpus:
        by_index.setdefault(gpu.index, []).append(gpu)
    found = [
        _Gpu(index, members[0].model, members[0].numa, any(m.name != index for m in members))
        for index, members in by_index.items()
    ]
    return sorted(
        found, key=lambda g: (0, int(g.index), "") if g.index.isdigit() else (1, 0, g.index)
    )


def check_node_name(name: str) -> str:
    """Return ``name`` if Slurm takes it as one node's name; raises InvalidError."""
    if not SLURM_NODE.fullmatch(name):
        raise InvalidError(
            f"--node-name: {name!r} is not a Slurm node name: use 1-64 letters, digits,"
            " '.', '_' or '-', starting and ending with a letter or digit",
            {"field": "--node-name", "value": name},
        )
    return name


def slurm_config(view: HostResources, node: str) -> str:
    """slurm.conf lines (``GresTypes``, the ``NodeName`` line with ``CPUs``,
    ``RealMemory`` in MiB and ``Gres``, a partition named after the pool) and
    gres.conf lines (one per GPU: ``Type``, ``File=/dev/nvidia<N>`` and ``Cores=``
    the CPUs of its NUMA node, left out where they are unknown), under
    ``# --- slurm.conf ---`` and ``# --- gres.conf ---`` markers.

    Raises InvalidError for a bad ``node`` or a pool without a whole CPU.
    """
    check_node_name(node)
    cpu = view.resources.get("cpu")
    if cpu is None or cpu.capacity < 1000:
        raise InvalidError(
            f"pool {view.pool!r} has no whole CPU, and a Slurm node needs CPUs=;"
            " export a pool with cpu (--pool host is the discovered host)",
            {"pool": view.pool},
        )
    gpus = _physical_gpus(view.gpus)
    types = gpu_types(g.model for g in gpus)
    cpus = cpu.capacity // 1000
    gres = [_gres_line(node, g, types[g.model], view.numa_cpus, cpus) for g in gpus]
    counts = Counter(types[g.model] for g in gpus)
    scalar_gpus = view.resources.get("gpu")
    if not gpus and scalar_gpus is not None and scalar_gpus.capacity > 0:
        counts[""] = scalar_gpus.capacity  # a counted gpu resource, no devices behind it
        gres.append(f"NodeName={node} Name=gpu Count={scalar_gpus.capacity}")
    skipped = [name for name in view.resources if name not in ("cpu", "memory", "gpu")]
    node_line = [f"NodeName={node}", f"CPUs={cpus}"]
    memory = view.resources.get("memory")
    if memory is not None and memory.capacity >= MIB:
        node_line.append(f"RealMemory={memory.capacity // MIB}")
    if counts:
        specs = (f"gpu:{kind}:{n}" if kind else f"gpu:{n}" for kind, n in sorted(counts.items()))
        node_line.append("Gres=" + ",".join(specs))
    node_line.append("State=UNKNOWN")
    lines = [
        f"# resd pool {view.pool} as one Slurm node (resctl export --format slurm);"
        " see docs/scale-out.md",
        *_not_exported(view.pool, sorted(skipped, key=resource_order)),
        *(
            f"# GPU {g.index} is in MIG mode: it is given whole here; describe its MIG"
            " instances with AutoDetect=nvml"
            for g in gpus
            if g.mig
        ),
        "# --- slurm.conf ---",
        *(["GresTypes=gpu"] if counts else []),
        " ".join(node_line),
        f"PartitionName={view.pool} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "# --- gres.conf ---",
        *gres,
    ]
    return "\n".join(lines) + "\n"


def _gres_line(node: str, gpu: _Gpu, kind: str, numa_cpus: Mapping[str, str], cpus: int) -> str:
    """One GPU's gres.conf line. ``Cores=`` only where its NUMA node's CPU list is
    known and within the node's ``cpus`` (a pool smaller than the host has CPU
    numbers Slurm would refuse)."""
    fields = [f"NodeName={node}", "Name=gpu"]
    if kind:
        fields.append(f"Type={kind}")
    fields.append(f"File=/dev/nvidia{gpu.index}" if gpu.index.isdigit() else "Count=1")
    cores = numa_cpus.get(gpu.numa, "") if gpu.numa else ""
    if CPU_LIST.fullmatch(cores) and max(int(n) for n in re.split("[,-]", cores)) < cpus:
        fields.append(f"Cores={cores}")
    return " ".join(fields)


def _not_exported(pool: str, names: Sequence[str]) -> list[str]:
    return [f"# not exported from pool {pool}: {', '.join(names)}"] if names else []


# ------------------------------------------------------------------- Kueue


@attrs.frozen
class _Cell:
    """One (flavor, Kubernetes resource) quota of a pool, and the resd resource and
    amount (internal units, or a member count) it comes from."""

    resource: str
    kube: str
    flavor: str
    capacity: int


@attrs.frozen
class _Quota:
    nominal: int
    borrowing: int | None = None


def _cells(pool: PoolInfo, types: Mapping[str, str]) -> list[_Cell]:
    """The pool's quotas by flavor: GPUs one cell per model, the rest one each. The
    capacity, not the oversubscribed limit: Kubernetes places pods by their requests
    against what nodes have, and oversubscribes only through limits above requests."""
    cells = []
    for usage in sorted(pool.resources, key=lambda r: resource_order(r.name)):
        kube = kube_resource(usage.name, usage.kind)
        if kube is None:
            continue
        if kube != GPU_RESOURCE:
            cells.append(_Cell(usage.name, kube, DEFAULT_FLAVOR, usage.capacity))
        elif usage.kind == "set":
            per_model = Counter(types[m.labels.get("model", "")] for m in usage.members)
            cells += sorted(
                (
                    _Cell(usage.name, kube, kind or UNTYPED_GPU_FLAVOR, n)
                    for kind, n in per_model.items()
                ),
                key=lambda c: c.flavor,
            )
        else:
            cells.append(_Cell(usage.name, kube, UNTYPED_GPU_FLAVOR, usage.capacity))
    return cells


def _spread(total: int, capacities: Sequence[int]) -> list[int]:
    """``total`` over cells in order, each filled to its capacity; the last takes any
    excess, so that the parts add up to ``total``."""
    parts = []
    for i, capacity in enumerate(capacities):
        part = total if i == len(capacities) - 1 else min(total, capacity)
        parts.append(part)
        total -= part
    return parts


def _tenant_quotas(
    cells: Sequence[_Cell], low: Mapping[str, int], high: Mapping[str, int]
) -> list[_Quota]:
    """A tenant's min and max per resd resource as per-cell quotas: the min spread
    over the resource's flavors, each allowed to borrow up to the max."""
    nominal: dict[int, int] = {}
    for resource in dict.fromkeys(c.resource for c in cells):
        at = [i for i, c in enumerate(cells) if c.resource == resource]
        parts = _spread(low.get(resource, 0), [cells[i].capacity for i in at])
        nominal.update(zip(at, parts, strict=True))
    quotas = []
    for i, cell in enumerate(cells):
        cap = high.get(cell.resource)
        quotas.append(_Quota(nominal[i], None if cap is None else max(0, cap - nominal[i])))
    return quotas


def _resource_groups(cells: Sequence[_Cell], quotas: Sequence[_Quota]) -> list[dict[str, Any]]:
    """Kueue resourceGroups: GPUs in a group of their own (a flavor per model), the
    rest in one with the default flavor; each flavor lists every covered resource."""
    groups = []
    for gpus in (False, True):
        members = [
            (c, q) for c, q in zip(cells, quotas, strict=True) if (c.kube == GPU_RESOURCE) is gpus
        ]
        if not members:
            continue
        covered = list(dict.fromkeys(c.kube for c, _ in members))
        flavors = list(dict.fromkeys(c.flavor for c, _ in members))
        quota_of = {(c.flavor, c.kube): (c, q) for c, q in members}
        groups.append(
            {
                "coveredResources": covered,
                "flavors": [
                    {
                        "name": flavor,
                        "resources": [_quota_map(*quota_of[flavor, kube]) for kube in covered],
                    }
                    for flavor in flavors
                ],
            }
        )
    return groups


def _quota_map(cell: _Cell, quota: _Quota) -> dict[str, Any]:
    entry = {"name": cell.kube, "nominalQuota": kube_quantity(cell.resource, quota.nominal)}
    if quota.borrowing is not None:
        entry["borrowingLimit"] = kube_quantity(cell.resource, quota.borrowing)
    return entry


def _object(kind: str, name: str, api: str = KUEUE_API, **rest: Any) -> dict[str, Any]:
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name}, **rest}


def _decimal(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


def _cluster_queues(
    pool: PoolInfo, cells: Sequence[_Cell], weights: Mapping[str, float]
) -> list[dict[str, Any]]:
    """The pool's cohort: its own ClusterQueue with what no tenant is guaranteed,
    and one per tenant with a quota here, its fair-share weight as Kueue's."""
    cohort = kube_name(pool.name)
    lower = pool.preemption == "lower_priority"
    preemption: dict[str, Any] = {
        "reclaimWithinCohort": "Any",
        "withinClusterQueue": "LowerPriority" if lower else "Never",
    }
    if lower:
        preemption["borrowWithinCohort"] = {"policy": "LowerPriority"}
    tenants = {
        name: _tenant_quotas(cells, quota.min, quota.max)
        for name, quota in sorted(pool.quotas.items())
    }
    guaranteed = [sum(q[i].nominal for q in tenants.values()) for i in range(len(cells))]
    shared = [_Quota(max(0, c.capacity - g)) for c, g in zip(cells, guaranteed, strict=True)]

    def queue(name: str, quotas: Sequence[_Quota], tenant: str | None) -> dict[str, Any]:
        spec: dict[str, Any] = {"cohort": cohort, "namespaceSelector": {}}
        if tenant is not None:
            spec["namespaceSelector"] = {"matchLabels": {NAMESPACE_LABEL: kube_name(tenant)}}
        if cells:
            spec["resourceGroups"] = _resource_groups(cells, quotas)
        spec["preemption"] = preemption
        if tenant is not None:
            spec["fairSharing"] = {"weight": _decimal(weights.get(tenant, 1.0))}
        return _object("ClusterQueue", name, spec=spec)

    return [
        queue(cohort, shared, None),
        *(queue(_tenant_queue(pool.name, t), quotas, t) for t, quotas in tenants.items()),
    ]


def _tenant_queue(pool: str, tenant: str) -> str:
    """A tenant's ClusterQueue in a pool: ``<pool>.<tenant>`` (a DNS subdomain whose
    dot no label-form name holds, so it never meets a pool's own queue)."""
    return f"{kube_name(pool)}.{kube_name(tenant)}"


def kueue_objects(pools: Sequence[PoolInfo], tenants: Sequence[TenantInfo]) -> list[dict[str, Any]]:
    """Kueue objects for ``pools`` and ``tenants``, in the order they can be applied:
    ResourceFlavors, WorkloadPriorityClasses, Namespaces, ClusterQueues, LocalQueues."""
    models = [
        m.labels.get("model", "")
        for pool in pools
        for r in pool.resources
        if r.name == "gpu" and r.kind == "set"
        for m in r.members
    ]
    types = gpu_types(models)
    cells = {pool.name: _cells(pool, types) for pool in pools}
    products = {kind or UNTYPED_GPU_FLAVOR: model for model, kind in types.items()}
    flavors = sorted({c.flavor for pool_cells in cells.values() for c in pool_cells})
    tenant_names = sorted({t.name for t in tenants} | {n for p in pools for n in p.quotas})
    priorities: dict[int, list[str]] = {}
    for tenant in sorted(tenants, key=lambda t: t.name):
        priorities.setdefault(tenant.priority, []).append(tenant.name)
    weights = {t.name: t.weight for t in tenants}
    objects = [_flavor(name, products.get(name, "")) for name in flavors]
    objects += [
        _object(
            "WorkloadPriorityClass",
            f"{PRIORITY_CLASS_PREFIX}{priority}",
            value=priority,
            description=f"resd priority {priority}: tenants {', '.join(names)}",
        )
        for priority, names in sorted(priorities.items())
    ]
    objects += [_object("Namespace", kube_name(name), api="v1") for name in tenant_names]
    for pool in sorted(pools, key=lambda p: p.name):
        objects += _cluster_queues(pool, cells[pool.name], weights)
    objects += [
        {
            "apiVersion": KUEUE_API,
            "kind": "LocalQueue",
            "metadata": {"name": kube_name(pool.name), "namespace": kube_name(tenant)},
            "spec": {
                "clusterQueue": _tenant_queue(pool.name, tenant)
                if tenant in pool.quotas
                else kube_name(pool.name)
            },
        }
        for tenant in tenant_names
        for pool in sorted(pools, key=lambda p: p.name)
    ]
    return objects


def _flavor(name: str, model: str) -> dict[str, Any]:
    """A ResourceFlavor; a GPU model's selects nodes by GPU feature discovery's label."""
    product = re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-_.")[:63].rstrip("-_.")
    if product and _LABEL_VALUE.fullmatch(product):
        return _object("ResourceFlavor", name, spec={"nodeLabels": {GPU_PRODUCT_LABEL: product}})
    return _object("ResourceFlavor", name)


def kueue_manifests(pools: Sequence[PoolInfo], tenants: Sequence[TenantInfo]) -> str:
    """``kueue_objects`` as one multi-document YAML stream for ``kubectl apply -f``,
    after comments naming what was not exported."""
    skipped = [
        line
        for pool in sorted(pools, key=lambda p: p.name)
        for line in _not_exported(
            pool.name,
            [
                r.name
                for r in sorted(pool.resources, key=lambda r: resource_order(r.name))
                if kube_resource(r.name, r.kind) is None
            ],
        )
    ]
    header = [
        "# resd pools and tenants as Kueue objects (resctl export --format kueue);"
        " see docs/scale-out.md",
        *skipped,
    ]
    body = yaml.safe_dump_all(kueue_objects(pools, tenants), sort_keys=False, explicit_start=True)
    return "\n".join(header) + "\n" + body
