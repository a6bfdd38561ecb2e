//! A conntrack table pinned by an earlier agent, whose values did not record each side's veth
//! (32 bytes), moves into a table of the current layout when a new agent loads the object: every
//! entry is converted, what the earlier programs add until the new ones are attached follows, an
//! entry the new programs wrote meanwhile wins, and the earlier table's pin goes. A table of a
//! layout the agent does not know is an error that says what to do.

use std::{
    ffi::CString,
    os::fd::{FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData};
use weir_agent::datapath::{conntrack_upgrade, loader};
use weir_common::{
    CT_EGRESS_ALLOWED, CT_INGRESS_ALLOWED, CT_SEEN_REPLY, CtKey, CtValue, MAP_CONNTRACK,
    MAX_CONNTRACK, PROTO_TCP,
};
use weir_tests::bpf_syscall::bpf;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// `union bpf_attr` for `BPF_MAP_CREATE`, up to the flags.
#[repr(C)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `union bpf_attr` for `BPF_OBJ_PIN`.
#[repr(C)]
struct ObjPin {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// A conntrack table as an agent pins it, with `value_size`-byte values, pinned at `path`.
fn pin_table(path: &Path, value_size: u32) {
    let mut create = MapCreate {
        map_type: BPF_MAP_TYPE_LRU_HASH,
        key_size: size_of::<CtKey>() as u32,
        value_size,
        max_entries: MAX_CONNTRACK,
        map_flags: 0,
    };
    let fd = bpf(BPF_MAP_CREATE, &mut create).expect("creating a conntrack table");
    // SAFETY: a new descriptor the kernel returned, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut pin = ObjPin {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut pin).expect("pinning the table");
}

/// A bpffs directory for one test's pins, removed with everything in it however the test ends.
struct PinDir(PathBuf);

impl PinDir {
    fn new(name: &str) -> Self {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/weir-test-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("bpffs is mounted at /sys/fs/bpf");
        Self(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The earlier value layout, as `u32` words: last seen (two words), egress and ingress
/// generation, flags, egress and ingress rule, padding.
type EarlierValue = [u32; 8];

fn earlier_value(
    last_seen_ns: u64,
    generations: (u32, u32),
    flags: u32,
    rules: (u32, u32),
) -> EarlierValue {
    [
        last_seen_ns as u32,
        (last_seen_ns >> 32) as u32,
        generations.0,
        generations.1,
        flags,
        rules.0,
        rules.1,
        0,
    ]
}

fn key(last_octet: u8, sport: u16) -> CtKey {
    let mut saddr = [0; 16];
    saddr[10..12].copy_from_slice(&[0xff, 0xff]);
    saddr[12..].copy_from_slice(&[10, 0, 0, last_octet]);
    let mut daddr = saddr;
    daddr[15] = 200;
    CtKey {
        saddr,
        daddr,
        sport: sport.to_be(),
        dport: 80u16.to_be(),
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
}

/// Writes `entries` into the earlier-layout table pinned at `pin`.
fn insert_earlier(pin: &Path, entries: &[(CtKey, EarlierValue)]) {
    let mut map = Map::LruHashMap(MapData::from_pin(pin).expect("an earlier table"));
    let mut table = HashMap::<_, CtKey, EarlierValue>::try_from(&mut map).unwrap();
    for (key, value) in entries {
        table.insert(key, value, 0).unwrap();
    }
}

fn current_table(dir: &Path) -> Map {
    Map::LruHashMap(MapData::from_pin(dir.join(MAP_CONNTRACK)).expect("the current table"))
}

#[test]
fn a_table_of_the_earlier_layout_moves_into_the_current_one() {
    let dir = PinDir::new("ctup");
    pin_table(&dir.0.join(MAP_CONNTRACK), 32);
    let both = CT_EGRESS_ALLOWED | CT_INGRESS_ALLOWED | CT_SEEN_REPLY;
    insert_earlier(
        &dir.0.join(MAP_CONNTRACK),
        &[
            (key(1, 40000), earlier_value(7 << 33, (7, 7), both, (3, 4))),
            (
                key(2, 40001),
                earlier_value(99, (6, 0), CT_EGRESS_ALLOWED, (5, 0)),
            ),
        ],
    );

    // The load sets the earlier table aside, creates the current one and copies every entry.
    let ebpf = loader::load(Some(&dir.0)).expect("the object loads over an earlier table");
    let mut current_map = current_table(&dir.0);
    let mut current = HashMap::<_, CtKey, CtValue>::try_from(&mut current_map)
        .expect("the current table has the current layout");
    let converted = current
        .get(&key(1, 40000), 0)
        .expect("the first entry, converted");
    assert_eq!(
        converted,
        CtValue {
            last_seen_ns: 7 << 33,
            egress_generation: 7,
            ingress_generation: 7,
            flags: CT_EGRESS_ALLOWED | CT_INGRESS_ALLOWED | CT_SEEN_REPLY,
            egress_rule: 3,
            ingress_rule: 4,
            egress_ifindex: 0,
            ingress_ifindex: 0,
            _pad: 0,
        },
        "every field carried over; no side's veth is known yet"
    );
    let second = current.get(&key(2, 40001), 0).expect("the second entry");
    assert_eq!((second.flags, second.egress_rule), (CT_EGRESS_ALLOWED, 5));

    // Until the new programs are attached, the earlier ones add connections to the earlier
    // table, and the new ones may already have checked a side of a copied entry.
    insert_earlier(
        &conntrack_upgrade::earlier_pin(&dir.0),
        &[(
            key(3, 40002),
            earlier_value(5, (7, 0), CT_EGRESS_ALLOWED, (8, 0)),
        )],
    );
    let checked = CtValue {
        egress_ifindex: 42,
        ..converted
    };
    current.insert(key(1, 40000), checked, 0).unwrap();

    assert_eq!(
        conntrack_upgrade::finish(&dir.0).unwrap(),
        1,
        "only the added entry"
    );
    let added = current
        .get(&key(3, 40002), 0)
        .expect("the entry added meanwhile");
    assert_eq!((added.flags, added.egress_rule), (CT_EGRESS_ALLOWED, 8));
    assert_eq!(
        current.get(&key(1, 40000), 0).unwrap(),
        checked,
        "an entry the new programs wrote is newer than the earlier table's"
    );
    assert!(
        !conntrack_upgrade::earlier_pin(&dir.0).exists(),
        "the earlier table's pin is gone"
    );
    assert_eq!(
        conntrack_upgrade::finish(&dir.0).unwrap(),
        0,
        "nothing left to do"
    );

    // A second load adopts the current table as it is.
    drop(ebpf);
    let _again = loader::load(Some(&dir.0)).expect("the object loads over its own table");
    assert!(current.get(&key(3, 40002), 0).is_ok());
    assert!(!conntrack_upgrade::earlier_pin(&dir.0).exists());
}

/// An agent stopped after pinning the earlier table aside but before unpinning it from the
/// current name leaves it pinned twice: the next one takes the upgrade up again.
#[test]
fn an_upgrade_stopped_between_the_two_pins_is_taken_up_again() {
    let dir = PinDir::new("ctresume");
    let current = dir.0.join(MAP_CONNTRACK);
    pin_table(&current, 32);
    MapData::from_pin(&current)
        .unwrap()
        .pin(conntrack_upgrade::earlier_pin(&dir.0))
        .unwrap();
    insert_earlier(
        &current,
        &[(
            key(4, 40003),
            earlier_value(1, (2, 0), CT_EGRESS_ALLOWED, (9, 0)),
        )],
    );
    let _ebpf = loader::load(Some(&dir.0)).expect("the object loads");
    assert_eq!(
        conntrack_upgrade::finish(&dir.0).unwrap(),
        0,
        "copied at the load"
    );
    let mut current_map = current_table(&dir.0);
    let table = HashMap::<_, CtKey, CtValue>::try_from(&mut current_map).unwrap();
    assert_eq!(table.get(&key(4, 40003), 0).unwrap().egress_rule, 9);
}

#[test]
fn a_table_of_an_unknown_layout_is_an_error_that_says_what_to_do() {
    let dir = PinDir::new("ctunknown");
    let pin = dir.0.join(MAP_CONNTRACK);
    pin_table(&pin, 24);
    let Err(error) = loader::load(Some(&dir.0)) else {
        panic!("the object cannot use a table of another layout");
    };
    let error = error.to_string();
    assert!(
        error.contains(&pin.display().to_string())
            && error.contains("24-byte values")
            && error.contains("remove the pin"),
        "the error names the table, its layout and what to do: {error}"
    );
    assert!(pin.exists(), "the table is left as it was");
}
