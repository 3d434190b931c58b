"""Holds: the devices a frontend keeps records of, which pool management must not pull away.

ZFS calls a tag that keeps a snapshot from being destroyed a *hold* (``zfs hold TAG SNAP``,
let go with ``zfs release``). Here the tag is a frontend, and its records are the hold:

    docker        the volumes Docker created (POOL/docker/volumes.json), by device uuid,
                  so a hold follows a volume renamed before this rule
    snapshotter   every device a containerd record names (POOL/containerd/snapshots.json),
                  and the base (ctd-base, ctd-base@fs) while there are records
    csi           the CSI plugin's volumes and snapshots (POOL/csi/state)

A device is held while its holder's records name it, whether the holder runs or not (it
comes back and trusts its records). A hold refuses, with DeviceBusy (exit 5) naming the
holder, the management operations that pull the device away or change what its holder
believes of it:

    destroy, rename       every hold (a volume's snapshots follow a rename: a held one
                          refuses the volume's rename too)
    resize --shrink       every hold (a file system or a layer spans the device)
    rollback, receive     containerd and CSI holds; not Docker's: restoring a stopped
                          container's volume to a snapshot is the plugin's documented use
                          (a mounted volume stays refused by the mount, control/guards.py);
                          a receive into an existing volume replaces its content as a
                          rollback does

``destroy --force`` overrides only a Docker hold: the plugin lets go of its mount and
Docker sees the volume gone, as before holds. A containerd layer or a Kubernetes volume
has dependants that the pool cannot tell of, so their holds yield only to their holder:
``ctr snapshots rm`` or deleting the PersistentVolumeClaim / VolumeSnapshot. Reads (list,
info, send, diff, snapshot, clone) are never refused. A frontend's own calls go to the Pool
directly and never meet a hold; holds are enforced by the control socket
(control/guards.py) and, on a pool no server holds, by the CLI (cli/holds.py).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from thinstore.frontends import statefile

#: holder -> how messages name it
HOLDERS = {"docker": "the docker volume plugin", "snapshotter": "the containerd snapshotter",
           "csi": "the CSI plugin"}
#: holder -> why its hold matters, said in a refusal
WHY = {"docker": "Docker and the containers made with it know it by this name",
       "snapshotter": "containerd's layers and containers depend on it",
       "csi": "Kubernetes knows it by its id and size"}
#: holder -> how to let go of the hold: the holder's own remove
RELEASE = {"docker": "remove it through Docker ('docker volume rm {volume}')",
           "snapshotter": "remove it through containerd ('ctr snapshots rm KEY')",
           "csi": "delete it through Kubernetes (its PersistentVolumeClaim or VolumeSnapshot)"}
ALL_OPS = ("destroy", "rename", "rollback", "shrink", "receive")
BLOCKS = {"docker": ("destroy", "rename", "shrink"), "snapshotter": ALL_OPS, "csi": ALL_OPS}
_VERBS = {"destroy": "destroy", "rename": "rename", "rollback": "roll back",
          "shrink": "shrink", "receive": "receive into"}

#: holder -> its state file under the pool's directory (each frontend's default)
RECORDS = {"docker": "docker/volumes.json", "snapshotter": "containerd/snapshots.json",
           "csi": "csi/state"}


def _kind(holder: str) -> tuple[str, str | None]:
    """(magic, key of the version-1 layout) of ``holder``'s state file, from its module."""
    if holder == "docker":
        from thinstore.frontends.docker.registry import MAGIC
        return MAGIC, "volumes"
    if holder == "snapshotter":
        from thinstore.frontends.containerd.store import MAGIC
        return MAGIC, "body"
    from thinstore.frontends.csi.state import MAGIC
    return MAGIC, None


@dataclass(frozen=True)
class Hold:
    """``device`` is held by frontend ``holder`` as ``what`` (its own words for it, e.g.
    "volume 'pg'"); ``blocks``: the operations refused (of ALL_OPS)."""

    device: str
    holder: str
    what: str
    blocks: tuple = ALL_OPS

    @property
    def forceable(self) -> bool:
        """Whether ``destroy --force`` may override it (module docstring)."""
        return self.holder == "docker"

    def describe(self) -> str:
        """'held by the docker volume plugin as volume 'pg''."""
        return f"held by {HOLDERS.get(self.holder, self.holder)} as {self.what}"

    def refusal(self, op: str) -> str:
        """The DeviceBusy message of ``op`` (of ALL_OPS) refused by this hold."""
        why = WHY.get(self.holder, "")
        release = RELEASE.get(self.holder, "").format(volume=self.device)
        if op == "destroy":
            how = release + (", or destroy it with --force (the plugin lets go of it)"
                             if self.forceable else "; not even --force overrides this")
        else:
            how = f"to be rid of it, {release}"
        return (f"cannot {_VERBS.get(op, op)} {self.device!r}: it is {self.describe()} "
                f"({why}); {how}")

    def to_dict(self) -> dict:
        return {**asdict(self), "blocks": list(self.blocks)}

    @classmethod
    def from_dict(cls, data: dict) -> "Hold":
        return cls(str(data["device"]), str(data["holder"]), str(data["what"]),
                   tuple(data.get("blocks") or ALL_OPS))


def blocking(holds, name: str, op: str) -> "Hold | None":
    """The first hold of ``holds`` on device ``name`` that refuses ``op``, or None."""
    return next((h for h in holds if h.device == name and op in h.blocks), None)


# ------------------------------------------------------------ each holder's records
def docker_holds(volumes: dict, devices: dict) -> list[Hold]:
    """Holds of the Docker registry's body ``volumes`` ({NAME: {"uuid", ...}}) over the
    pool's ``devices`` (name -> uuid): an entry holds the device of its uuid under whatever
    name it has now (a rename before holds), or, while "creating" (no uuid), its name."""
    by_uuid = {uuid: name for name, uuid in devices.items()}
    held = []
    for name, entry in sorted(volumes.items()):
        uuid = entry.get("uuid") if isinstance(entry, dict) else None
        device = by_uuid.get(uuid) if uuid else (name if name in devices else None)
        if device is not None:
            # Docker knows it by the device's name: the plugin lists devices, and its
            # registry follows a rename made before holds (Registry.follow)
            held.append(Hold(device, "docker", f"volume {device!r}", BLOCKS["docker"]))
    return held


def snapshotter_holds(body: dict, devices: dict) -> list[Hold]:
    """Holds of the containerd store's ``body`` (store.py): each record's device, and the
    base while there is any record."""
    records = body.get("snapshots") or {}
    held = [Hold(r["device"], "snapshotter", f"{r.get('kind', '')} snapshot {key!r}".lstrip(),
                 BLOCKS["snapshotter"])
            for key, r in sorted(records.items()) if r.get("device") in devices]
    if records:
        held += [Hold(base, "snapshotter", "the base file system of every layer",
                      BLOCKS["snapshotter"])
                 for base in ("ctd-base", "ctd-base@fs") if base in devices]
    return held


def csi_holds(data: dict, devices: dict) -> list[Hold]:
    """Holds of the CSI controller's records (csi/state.py): its volumes and snapshots."""
    held = []
    for kind, word in (("volumes", "volume"), ("snapshots", "snapshot")):
        for name, rec in sorted((data.get(kind) or {}).items()):
            if isinstance(rec, dict) and rec.get("id") in devices:
                held.append(Hold(rec["id"], "csi", f"{word} {name!r}", BLOCKS["csi"]))
    return held


_FROM_RECORDS = {"docker": docker_holds, "snapshotter": snapshotter_holds, "csi": csi_holds}


def from_records(holder: str, data: dict, devices: dict) -> list[Hold]:
    """The holds of ``holder``'s state-file body ``data`` over ``devices`` (name -> uuid)."""
    return _FROM_RECORDS[holder](data or {}, devices)


def recorded(pool_dir: str, devices: dict, skip=()) -> tuple[list[Hold], list[str]]:
    """(holds, problems): the holds the frontends' state files at their default places
    under ``pool_dir`` record over ``devices`` (name -> uuid), for every holder not in
    ``skip`` (those running say their own). A damaged file holds nothing and is named in
    ``problems``: its frontend refuses to start until someone looks at it anyway."""
    holds, problems = [], []
    for holder, relative in RECORDS.items():
        if holder in skip:
            continue
        path = os.path.join(pool_dir, relative)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror}")
            continue
        try:
            magic, legacy_key = _kind(holder)
            data = statefile.decode(raw, magic, path, legacy_key)
            holds += from_records(holder, data, devices)
        except (statefile.StateFileError, AttributeError, KeyError, TypeError) as exc:
            problems.append(f"{exc}" if isinstance(exc, statefile.StateFileError)
                            else f"{path}: unexpected content ({exc!r})")
    return holds, problems
