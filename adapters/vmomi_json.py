"""Objects back from the JSON that pyVmomi's `VmomiJSONEncoder` writes (it has no decoder).

The encoder writes a data object as a JSON object with its properties and `_vimtype` (its vmodl name, e.g.
"vim.vm.device.VirtualDisk"), a managed object reference as the string "vim.Datastore:datastore-12", binary
as base64 and times as ISO 8601. `from_json` reverses that, property by property, as each type declares it, so
a saved `vim.vm.ConfigInfo` (or any part of it) becomes pyVmomi objects again; properties a type does not know
(written by a newer vSphere) are left out.
"""

from __future__ import annotations

import base64
from typing import Any

from pyVmomi import Iso8601, VmomiSupport


def vmodl_type(name: str) -> type:
    """The pyVmomi class of a vmodl name ("vim.vm.device.VirtualDisk")."""
    return VmomiSupport.GetVmodlType(name)


def _value(raw: Any, kind: type) -> Any:
    if raw is None:
        return None
    if (isinstance(kind, type) and issubclass(kind, list)) or getattr(kind, "Item", None) is not None:
        item = getattr(kind, "Item", object)
        return [_value(v, item) for v in raw or []]
    if isinstance(raw, dict):
        return from_json(raw)
    if isinstance(kind, type) and issubclass(kind, VmomiSupport.ManagedObject) and isinstance(raw, str):
        type_name, _, moid = raw.partition(":")
        return vmodl_type(type_name)(moid)
    if kind is VmomiSupport.binary and isinstance(raw, str):
        return base64.b64decode(raw)
    if kind is VmomiSupport.datetime and isinstance(raw, str):
        return Iso8601.ParseISO8601(raw)
    if kind is type and isinstance(raw, str):  # a property typed "type" holds a vmodl name
        return vmodl_type(raw)
    return raw


def from_json(data: dict[str, Any]) -> Any:
    """A pyVmomi data object from its encoded JSON (a dict with `_vimtype`)."""
    name = data.get("_vimtype")
    if not isinstance(name, str):
        raise ValueError("not an encoded vSphere data object: no _vimtype")
    cls = vmodl_type(name)
    props = {p.name: p.type for p in cls._GetPropertyList()}
    obj = cls()
    for key, raw in data.items():
        if key.startswith("_") or key not in props or raw is None:
            continue
        value = _value(raw, props[key])
        if isinstance(value, list) and not value:
            continue
        setattr(obj, key, value)
    return obj
