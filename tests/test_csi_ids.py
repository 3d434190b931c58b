"""CSI names map to pool device names reversibly and without collisions (ids.py)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from thinstore import names
from thinstore.frontends.csi import ids

# CSI names: any Unicode without the control characters the spec bans, up to 128 bytes
BANNED = [chr(c) for c in [*range(0x00, 0x09), 0x0b, 0x0c, *range(0x0e, 0x20),
                           *range(0x7f, 0xa0)]]
csi_names = st.text(st.characters(blacklist_characters=BANNED, blacklist_categories=["Cs"]),
                    min_size=1, max_size=40).filter(lambda n: len(n.encode()) <= 128)


@settings(max_examples=120, deadline=None)
@given(csi_names, csi_names)
def test_every_csi_name_is_a_valid_device_name_and_comes_back(vol, snap):
    device = ids.volume_device(vol)
    snapshot = ids.snapshot_device(device, snap)
    names.check_name(device, snapshot=False)
    names.check_name(snapshot, snapshot=True)
    names.check_name(ids.clone_temp(device, ids.volume_device(snap)), snapshot=True)
    assert ids.is_volume_id(device) and ids.is_snapshot_id(snapshot)
    for name, dev in ((vol, device), (snap, snapshot)):
        back = ids.csi_name_of(dev)
        assert back == name or (back is None and ":h" in dev)   # hashed: found in the state


@settings(max_examples=120, deadline=None)
@given(csi_names, csi_names)
def test_different_names_never_share_a_device(a, b):
    if a != b:
        assert ids.volume_device(a) != ids.volume_device(b)


def test_long_and_odd_names():
    longest = "é" * 64                                   # 128 bytes: hashed
    assert ids.csi_name_of(ids.volume_device(longest)) is None
    assert len(ids.snapshot_device(ids.volume_device(longest), longest)) <= 255
    assert ids.csi_name_of(ids.volume_device("a:b@c d")) == "a:b@c d"
    assert ids.volume_device("a:b") != ids.volume_device("a:3ab")
    assert not ids.is_volume_id("pvc-1") and not ids.is_snapshot_id("csi.a@b")
