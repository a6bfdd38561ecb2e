//! Property test of the sync protocol: random upserts, removes, disconnects (frames in flight
//! lost), exporter restarts with a new incarnation (its history lost, some entries kept) and
//! partial deliveries between an [`Exporter`] and an [`Importer`].
//!
//! Checked after every delivered frame:
//! - no entry is deleted early: whenever the importer deletes a name, the exporter did not hold
//!   it at the version the importer now claims (the delta's or the `Synced` version);
//! - outside a snapshot and at every `Synced`, the importer equals the exporter's entries at
//!   the importer's version, exactly;
//! - an honest exporter never gets a NACK.
//!
//! And at the end, after a reconnect and full delivery, the importer equals the exporter.

use std::collections::{BTreeMap, HashMap, VecDeque};

use proptest::prelude::*;
use weir_mesh::sync::{Exporter, Frame, Importer, Limits, Resume};

#[derive(Clone, Debug)]
enum Op {
    /// Upsert names `key..key+n` with value `v`.
    Upsert {
        key: u8,
        n: u8,
        v: u8,
    },
    Remove {
        key: u8,
        n: u8,
    },
    /// The session sends what changed since its cursor.
    Poll,
    /// Deliver up to n frames in flight.
    Deliver(u8),
    /// Connection lost: frames in flight are gone.
    Disconnect,
    Connect,
    /// The exporter restarts without history: new incarnation, keeps names with `key % m == 0`.
    Restart {
        incarnation: u64,
        keep_mod: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..40, 1u8..6, any::<u8>()).prop_map(|(key, n, v)| Op::Upsert { key, n, v }),
        2 => (0u8..40, 1u8..6).prop_map(|(key, n)| Op::Remove { key, n }),
        3 => Just(Op::Poll),
        4 => (1u8..8).prop_map(Op::Deliver),
        1 => Just(Op::Disconnect),
        2 => Just(Op::Connect),
        1 => (any::<u64>(), 1u8..4).prop_map(|(incarnation, keep_mod)| Op::Restart { incarnation, keep_mod }),
    ]
}

struct Harness {
    exporter: Exporter<u8>,
    /// The exporter's entries at every (incarnation, version) it has had.
    history: HashMap<(u64, u64), BTreeMap<String, u8>>,
    importer: Importer<u8>,
    limits: Limits,
    max_delta: usize,
    /// The session's cursor (what it has sent up to), when connected.
    session: Option<u64>,
    in_flight: VecDeque<Frame<u8>>,
    /// The importer's (incarnation, version) as it claims after each frame.
    claim: Option<Resume>,
    in_snapshot: Option<Resume>,
}

impl Harness {
    fn new(incarnation: u64, history_limit: usize, max_delta: usize) -> Self {
        let exporter = Exporter::new(incarnation, history_limit);
        let mut history = HashMap::new();
        history.insert((incarnation, 0), BTreeMap::new());
        Self {
            exporter,
            history,
            importer: Importer::new(),
            limits: Limits {
                max_entries: 1_000,
                max_delta_entries: max_delta,
            },
            max_delta,
            session: None,
            in_flight: VecDeque::new(),
            claim: None,
            in_snapshot: None,
        }
    }

    fn record(&mut self) {
        self.history.insert(
            (self.exporter.incarnation(), self.exporter.version()),
            self.exporter.entries().clone(),
        );
    }

    fn state_at(&self, at: Resume) -> &BTreeMap<String, u8> {
        self.history
            .get(&(at.incarnation, at.version))
            .expect("the exporter had this version")
    }

    fn run(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Upsert { key, n, v } => {
                let ups = (key..key.saturating_add(n))
                    .map(|k| (format!("k{k}"), v))
                    .collect();
                if self.exporter.update(ups, vec![]) {
                    self.record();
                }
            }
            Op::Remove { key, n } => {
                let rm = (key..key.saturating_add(n))
                    .map(|k| format!("k{k}"))
                    .collect();
                if self.exporter.update(vec![], rm) {
                    self.record();
                }
            }
            Op::Poll => {
                if let Some(cursor) = self.session {
                    let from = Resume {
                        incarnation: self.exporter.incarnation(),
                        version: cursor,
                    };
                    self.in_flight.extend(self.exporter.catch_up(
                        Some(from),
                        self.max_delta,
                        false,
                    ));
                    self.session = Some(self.exporter.version());
                }
            }
            Op::Deliver(n) => {
                for _ in 0..n {
                    let Some(frame) = self.in_flight.pop_front() else {
                        break;
                    };
                    self.deliver(&frame)?;
                }
            }
            Op::Disconnect => self.disconnect(),
            Op::Connect => {
                if self.session.is_none() {
                    let frames =
                        self.exporter
                            .catch_up(self.importer.resume(), self.max_delta, true);
                    self.in_flight.extend(frames);
                    self.session = Some(self.exporter.version());
                }
            }
            Op::Restart {
                incarnation,
                keep_mod,
            } => {
                if incarnation == self.exporter.incarnation()
                    || self.history.keys().any(|(i, _)| *i == incarnation)
                {
                    return Ok(());
                }
                self.disconnect();
                let kept: Vec<(String, u8)> = self
                    .exporter
                    .entries()
                    .iter()
                    .filter(|(k, _)| k[1..].parse::<u8>().unwrap() % keep_mod == 0)
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                self.exporter = Exporter::new(incarnation, 8);
                self.record();
                if self.exporter.update(kept, vec![]) {
                    self.record();
                }
            }
        }
        Ok(())
    }

    fn disconnect(&mut self) {
        self.session = None;
        self.in_flight.clear();
        self.importer.disconnected();
    }

    fn deliver(&mut self, frame: &Frame<u8>) -> Result<(), TestCaseError> {
        let before = self.importer.entries().clone();
        let applied = self
            .importer
            .apply(frame, &self.limits, |_, _| Ok::<(), String>(()));
        prop_assert!(
            applied.is_ok(),
            "honest frame refused: {:?} for {frame:?}",
            applied
        );
        let applied = applied.unwrap();
        // Where the importer now claims to be.
        match frame {
            Frame::Snapshot {
                incarnation,
                version,
            } => {
                self.in_snapshot = Some(Resume {
                    incarnation: *incarnation,
                    version: *version,
                });
            }
            Frame::Delta(d) if self.in_snapshot.is_none() => {
                self.claim = Some(Resume {
                    incarnation: d.incarnation,
                    version: d.version,
                });
            }
            Frame::Delta(_) => {}
            Frame::Synced {
                incarnation,
                version,
            } => {
                self.in_snapshot = None;
                self.claim = Some(Resume {
                    incarnation: *incarnation,
                    version: *version,
                });
                prop_assert!(applied.synced);
            }
        }
        let after = self.importer.entries();
        // Nothing deleted early.
        for name in before.keys().filter(|k| !after.contains_key(*k)) {
            prop_assert!(
                self.in_snapshot.is_none(),
                "{name} deleted in the middle of a snapshot"
            );
            let claim = self.claim.expect("a deletion comes with a version");
            prop_assert!(
                !self.state_at(claim).contains_key(name),
                "{name} deleted although the exporter held it at {claim:?}"
            );
        }
        // Exact mirror whenever the importer is not in a snapshot.
        if self.in_snapshot.is_none()
            && let Some(claim) = self.claim
        {
            prop_assert_eq!(after, self.state_at(claim), "at {:?}", claim);
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn importer_mirrors_exporter_and_never_deletes_early(
        incarnation in any::<u64>(),
        history_limit in 1usize..16,
        max_delta in 1usize..12,
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let mut h = Harness::new(incarnation, history_limit, max_delta);
        for op in ops {
            h.run(op)?;
        }
        // Settle: a fresh session, everything delivered.
        h.disconnect();
        h.run(Op::Connect)?;
        while let Some(f) = h.in_flight.pop_front() {
            h.deliver(&f)?;
        }
        prop_assert!(h.importer.is_synced());
        prop_assert_eq!(h.importer.entries(), h.exporter.entries());
    }

    /// A restored (persisted and reloaded) importer resumes where it was.
    #[test]
    fn persisted_importer_resumes(
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let mut h = Harness::new(7, 8, 4);
        for op in ops {
            h.run(op)?;
        }
        let saved = serde_json::to_string(&h.importer).unwrap();
        h.importer = serde_json::from_str(&saved).unwrap();
        prop_assert!(!h.importer.is_synced(), "a restored importer waits for its next Synced");
        h.disconnect();
        h.run(Op::Connect)?;
        while let Some(f) = h.in_flight.pop_front() {
            h.deliver(&f)?;
        }
        prop_assert_eq!(h.importer.entries(), h.exporter.entries());
    }
}

#[test]
fn resume_sends_only_the_missing_delta() {
    let mut e: Exporter<u8> = Exporter::new(1, 64);
    let mut i: Importer<u8> = Importer::new();
    let limits = Limits::default();
    e.update((0..100).map(|k| (format!("k{k}"), 1)).collect(), vec![]);
    for f in e.catch_up(i.resume(), 1000, true) {
        i.apply(&f, &limits, |_, _| Ok::<(), ()>(())).unwrap();
    }
    i.disconnected();
    e.update(vec![("k5".into(), 2)], vec!["k6".into()]);
    let frames = e.catch_up(i.resume(), 1000, true);
    assert_eq!(frames.len(), 2, "one delta and Synced: {frames:?}");
    let Frame::Delta(d) = &frames[0] else {
        panic!("not a delta: {:?}", frames[0]);
    };
    assert_eq!((d.upsert.len(), d.remove.len()), (1, 1));
    for f in frames {
        i.apply(&f, &limits, |_, _| Ok::<(), ()>(())).unwrap();
    }
    assert_eq!(i.entries(), e.entries());
}

#[test]
fn limits_and_refusals_nack_without_applying_anything() {
    let mut e: Exporter<u8> = Exporter::new(1, 64);
    e.update((0..10).map(|k| (format!("k{k}"), 1)).collect(), vec![]);
    let frames = e.catch_up(None, 1000, true);
    let mut i: Importer<u8> = Importer::new();
    let small = Limits {
        max_entries: 5,
        max_delta_entries: 1000,
    };
    i.apply(&frames[0], &small, |_, _| Ok::<(), &str>(()))
        .unwrap();
    let err = i
        .apply(&frames[1], &small, |_, _| Ok::<(), &str>(()))
        .unwrap_err();
    assert!(
        matches!(
            err,
            weir_mesh::sync::ImportError::TooManyEntries {
                count: 10,
                limit: 5
            }
        ),
        "{err}"
    );
    assert!(i.entries().is_empty());
    let narrow = Limits {
        max_entries: 100,
        max_delta_entries: 3,
    };
    let err = i
        .apply(&frames[1], &narrow, |_, _| Ok::<(), &str>(()))
        .unwrap_err();
    assert!(
        matches!(
            err,
            weir_mesh::sync::ImportError::DeltaTooLarge { len: 10, limit: 3 }
        ),
        "{err}"
    );
    let err = i
        .apply(&frames[1], &Limits::default(), |n, _| {
            if n == "k7" { Err("no k7") } else { Ok(()) }
        })
        .unwrap_err();
    assert_eq!(err.to_string(), "entry `k7` refused: no k7");
    assert!(i.entries().is_empty(), "a refused delta applies nothing");
}
