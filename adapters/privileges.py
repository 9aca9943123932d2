"""The logged-in user's effective privileges, as vCenter's AuthorizationManager answers for them.

`placement` names the objects only vCenter knows for a check (the root folder, the folders and resource pools of
the sampled VMs); `effective` asks `HasPrivilegeOnEntities` about the session's own user, one call per batch of
objects that need the same privileges (never one per privilege). Where vCenter answers a batch with a fault
(an older vCenter without the method, a privilege the user lacks to ask), its pairs are None: not checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pyVmomi import VmomiSupport, vmodl

from adapters.properties import managed, read, read_one
from adapters.session import Session
from adapters.tasks import describe_fault
from vsphere_proxy.model import VM
from vsphere_proxy.privileges import SAMPLE, Entity, On

BATCH = 100  # objects per HasPrivilegeOnEntities call


@dataclass
class Answers:
    """vCenter's answer per (object, privilege): granted or not, None when it did not answer; and the faults it
    answered instead, one line each."""

    granted: dict[tuple[Entity, str], bool | None] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)


def _ref(session: Session, e: Entity) -> object:
    return managed(session, VmomiSupport.GetVmodlType(f"vim.{e.type}"), e.moref)


def _entity(obj: object, name: object) -> Entity:
    return Entity(type(obj).__name__.rsplit(".", 1)[-1], obj._moId, str(name or obj._moId))  # type: ignore[attr-defined]


def placement(session: Session, vms: Sequence[VM], limit: int = SAMPLE) -> dict[On, list[Entity]]:
    """The root folder ("vcenter") and, of `vms`, their folders and resource pools (at most `limit` of each),
    with their names: two property reads."""
    root = session.content.rootFolder
    refs = [managed(session, VmomiSupport.GetVmodlType("vim.VirtualMachine"), vm.moref) for vm in vms]
    props = read(session, refs, ["parent", "resourcePool"])
    folders = list({p["parent"]._moId: p["parent"] for p in props.values() if p.get("parent") is not None}.values())
    pools = list({p["resourcePool"]._moId: p["resourcePool"] for p in props.values()
                  if p.get("resourcePool") is not None}.values())
    folders, pools = folders[:limit], pools[:limit]
    names = read(session, [root, *folders, *pools], ["name"])
    return {
        "vcenter": [_entity(root, names.get(root._moId, {}).get("name"))],
        "folder": [_entity(f, names.get(f._moId, {}).get("name")) for f in folders],
        "resource-pool": [_entity(p, names.get(p._moId, {}).get("name")) for p in pools],
    }


def _batches(wanted: Mapping[Entity, Sequence[str]]) -> Iterable[tuple[list[Entity], list[str]]]:
    """The objects grouped by the privileges asked about them (in first-seen order), at most BATCH per group."""
    groups: dict[tuple[str, ...], list[Entity]] = {}
    for e, privileges in wanted.items():
        if privileges:
            groups.setdefault(tuple(dict.fromkeys(privileges)), []).append(e)
    for privileges, entities in groups.items():
        for i in range(0, len(entities), BATCH):
            yield entities[i:i + BATCH], list(privileges)


def effective(session: Session, wanted: Mapping[Entity, Sequence[str]]) -> Answers:
    """Whether the session's user holds each privilege of `wanted` on its object (through a permission there or
    propagating from above), per vCenter's `HasPrivilegeOnEntities`; None for the pairs of a batch vCenter
    answered with a fault, or left out of its answer."""
    answers = Answers({(e, p): None for e, privileges in wanted.items() for p in privileges})
    if not answers.granted:
        return answers
    manager = session.content.authorizationManager
    current = read_one(session, session.content.sessionManager, ["currentSession"]).get("currentSession")
    if manager is None or current is None:
        answers.faults.append("vCenter has no AuthorizationManager or no current session to ask about")
        return answers
    for entities, privileges in _batches(wanted):
        by_moref = {e.moref: e for e in entities}
        try:
            result = manager.HasPrivilegeOnEntities(entity=[_ref(session, e) for e in entities],
                                                    sessionId=current.key, privId=privileges)
        except vmodl.MethodFault as fault:
            answers.faults.append(f"HasPrivilegeOnEntities: {describe_fault(fault)}")
            continue
        for item in result or []:
            e = by_moref.get(getattr(item.entity, "_moId", None))
            if e is None:
                continue
            for availability in item.privAvailability or []:
                if (e, availability.privId) in answers.granted:
                    answers.granted[(e, availability.privId)] = bool(availability.isGranted)
    return answers
