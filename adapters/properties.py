"""Read properties of known managed objects with the PropertyCollector (STYLE §5).

One RetrievePropertiesEx for any number of objects, ContinueRetrievePropertiesEx while vCenter pages. Never
pyvmomi's lazy attribute access: it costs a round trip per attribute, and reading an unset property that way
fails on some servers. An unset property is simply absent from the returned dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from pyVmomi import VmomiSupport, vim, vmodl

from adapters.session import Session

PC = vmodl.query.PropertyCollector

M = TypeVar("M", bound=VmomiSupport.ManagedObject)


def managed(session: Session, kind: type[M], moref: str) -> M:
    """A stub for the managed object `moref` (e.g. "vm-42") of type `kind`; no round trip."""
    return kind(moref, session.si._stub)


def vm(session: Session, moref: str) -> vim.VirtualMachine:
    return managed(session, vim.VirtualMachine, moref)


def read(session: Session, objects: Iterable[Any], paths: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`paths` of every object in `objects`, keyed by moref; the objects may be of different types."""
    objects = list(objects)
    if not objects:
        return {}
    types = list(dict.fromkeys(type(o) for o in objects))
    spec = PC.FilterSpec(
        objectSet=[PC.ObjectSpec(obj=o, skip=False) for o in objects],
        propSet=[PC.PropertySpec(type=t, pathSet=list(paths), all=False) for t in types],
    )
    collector = session.content.propertyCollector
    out: dict[str, dict[str, Any]] = {o._moId: {} for o in objects}
    result = collector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
    while result is not None:
        for obj in result.objects:
            out[obj.obj._moId] = {p.name: p.val for p in obj.propSet or []}
        if not result.token:
            break
        result = collector.ContinueRetrievePropertiesEx(result.token)
    return out


def read_one(session: Session, obj: Any, paths: Sequence[str]) -> dict[str, Any]:
    """`paths` of one object."""
    return read(session, [obj], paths)[obj._moId]


def datastore_names(session: Session, refs: Iterable[Any]) -> dict[str, str]:
    """Names of the datastores `refs` (None entries are skipped), keyed by moref, in one round trip."""
    unique = {r._moId: r for r in refs if r is not None}
    return {moref: str(p.get("name", "")) for moref, p in read(session, unique.values(), ["name"]).items()}


def host_datastores(session: Session, host: Any) -> tuple[str, set[str]]:
    """The host's name and the names of the datastores it mounts, in one round trip (a traversal over
    `HostSystem.datastore`)."""
    traversal = PC.TraversalSpec(name="datastores", type=vim.HostSystem, path="datastore", skip=False)
    spec = PC.FilterSpec(
        objectSet=[PC.ObjectSpec(obj=host, skip=False, selectSet=[traversal])],
        propSet=[PC.PropertySpec(type=vim.HostSystem, pathSet=["name"], all=False),
                 PC.PropertySpec(type=vim.Datastore, pathSet=["name"], all=False)],
    )
    collector = session.content.propertyCollector
    name, datastores = "", set()
    result = collector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
    while result is not None:
        for obj in result.objects:
            value = next((str(p.val) for p in obj.propSet or [] if p.name == "name"), "")
            if isinstance(obj.obj, vim.HostSystem):
                name = value
            else:
                datastores.add(value)
        if not result.token:
            break
        result = collector.ContinueRetrievePropertiesEx(result.token)
    return name, datastores
