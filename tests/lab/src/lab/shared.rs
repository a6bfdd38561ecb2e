//! One lab shared by the tests of a test binary: built by the first test that asks for it, held
//! by one test at a time, taken down when the process exits. Its name carries the pid
//! ([`super::process_name`]), so two runs at once each have their own lab; the lab of a run that
//! was killed (same tag, pid no longer alive) is taken down when the next run starts.
//!
//! A test holds it as a [`Case`]: the lab reset to how it came up (no NetworkPolicy, every Pod
//! and Namespace with its original labels); truth tables probed once the agents report the
//! manifests directory applied; a differing table explained from the agents' flows and logs.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, Once, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use super::state::State;
use super::{Expectations, Lab, LabSpec, ProbeOptions, ProbeSpec, Proto, process_name};
use crate::{objects, process};

/// A lab per test process, made from `spec` on first use.
pub struct SharedLab {
    tag: &'static str,
    spec: fn(name: &str) -> LabSpec,
    wait_applied: fn(&Lab),
    cell: OnceLock<Result<Mutex<Held>, String>>,
}

/// The lab and the labels its Pods and Namespaces came up with (what a case resets to).
struct Held {
    lab: Lab,
    original_labels: Vec<(LabeledObject, BTreeMap<String, String>)>,
}

/// A Pod or Namespace: (kind, namespace, name).
type LabeledObject = (&'static str, Option<String>, String);

impl SharedLab {
    /// `tag`: 1 to 5 characters of a-z and 0-9 (the lab's name is the tag and the pid).
    /// `spec`: the lab, given its name. `wait_applied`: returns once every agent of the lab has
    /// written the manifests directory, as it is now, to its datapath (the agent's own
    /// fingerprint of the directory decides, which this crate does not build).
    pub const fn new(
        tag: &'static str,
        spec: fn(name: &str) -> LabSpec,
        wait_applied: fn(&Lab),
    ) -> Self {
        SharedLab {
            tag,
            spec,
            wait_applied,
            cell: OnceLock::new(),
        }
    }

    /// Waits for the lab (building it on first use) and resets it for case `name`.
    pub fn case(&'static self, name: &str) -> Case {
        let held = self.lock();
        let mut case = Case {
            held,
            name: name.to_owned(),
            started: Instant::now(),
            wait_applied: self.wait_applied,
        };
        case.reset();
        case
    }

    fn lock(&'static self) -> MutexGuard<'static, Held> {
        let shared = self.cell.get_or_init(|| self.build().map(Mutex::new));
        match shared {
            // A case that panicked leaves the lab as it was; the next case resets it.
            Ok(m) => m.lock().unwrap_or_else(|poisoned| poisoned.into_inner()),
            Err(e) => panic!("the shared lab did not come up: {e}"),
        }
    }

    fn build(&self) -> Result<Held, String> {
        take_down_orphans(self.tag);
        let name = process_name(self.tag);
        let started = Instant::now();
        let lab = Lab::up((self.spec)(&name)).map_err(|e| format!("{e:#}"))?;
        take_down_at_exit(&name);
        eprintln!("lab {name} up in {:.1} s", started.elapsed().as_secs_f64());
        let original_labels = labeled_objects(&lab).map_err(|e| format!("{e:#}"))?;
        Ok(Held {
            lab,
            original_labels,
        })
    }
}

/// The Pods and Namespaces in the lab's manifests directory, with their labels.
fn labeled_objects(lab: &Lab) -> anyhow::Result<Vec<(LabeledObject, BTreeMap<String, String>)>> {
    let mut found = Vec::new();
    for object in objects::load(&lab.state().manifests_dir())? {
        let kind = match object.kind() {
            "Pod" => "Pod",
            "Namespace" => "Namespace",
            _ => continue,
        };
        let key = (
            kind,
            object.namespace().map(str::to_owned),
            object.name().to_owned(),
        );
        found.push((key, object.labels()));
    }
    Ok(found)
}

/// Takes down the labs of this tag whose test process is gone (a run that was killed).
fn take_down_orphans(tag: &str) {
    for name in State::all_names() {
        let Some(pid) = name.strip_prefix(tag).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id()
            && !process::alive(pid)
            && let Err(e) = super::down(&name)
        {
            eprintln!("taking down lab {name}, left by a run that was killed: {e:#}");
        }
    }
}

/// The labs this process takes down when it exits (a static lab is never dropped).
static AT_EXIT: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn take_down_at_exit(name: &str) {
    static REGISTER: Once = Once::new();
    AT_EXIT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(name.to_owned());
    // SAFETY: registering a plain extern "C" function.
    REGISTER.call_once(|| unsafe {
        libc::atexit(take_down_labs);
    });
}

extern "C" fn take_down_labs() {
    let names = std::mem::take(&mut *AT_EXIT.lock().unwrap_or_else(|p| p.into_inner()));
    for name in names {
        if let Err(e) = super::down(&name) {
            eprintln!("taking down lab {name}: {e:#}");
        }
    }
}

/// The probe of a truth table: one connection (or two UDP datagrams) a cell, the cells the
/// expectations deny with a short timeout (an allowed local connection answers in well under
/// it), those they allow again after a miss within a bound (for failures only).
fn truth_table_probe(port: u16, proto: Proto) -> ProbeSpec {
    ProbeSpec {
        ports: Some(vec![(port, proto)]),
        options: ProbeOptions {
            timeout: Duration::from_millis(1000),
            udp_attempts: 2,
            retry_within: None,
        },
        denied_timeout: Some(Duration::from_millis(250)),
        allowed_within: Some(Duration::from_secs(5)),
        ..ProbeSpec::default()
    }
}

/// The shared lab, held by one test.
pub struct Case {
    held: MutexGuard<'static, Held>,
    name: String,
    started: Instant,
    wait_applied: fn(&Lab),
}

impl Case {
    pub fn lab(&self) -> &Lab {
        &self.held.lab
    }

    pub fn lab_mut(&mut self) -> &mut Lab {
        &mut self.held.lab
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deletes every NetworkPolicy and gives every Pod and Namespace its original labels.
    fn reset(&mut self) {
        let held = &mut *self.held;
        held.lab
            .delete_kind("NetworkPolicy")
            .expect("deleting policies");
        for ((kind, namespace, name), want) in &held.original_labels {
            let namespace = namespace.as_deref();
            let now = held.lab.labels(kind, namespace, name).expect("labels");
            if &now != want {
                held.lab
                    .set_labels(kind, namespace, name, want)
                    .expect("resetting labels");
            }
        }
    }

    /// Returns once every agent has applied the manifests directory as it is now.
    pub fn wait_applied(&self) {
        (self.wait_applied)(self.lab());
    }

    /// Applies manifests (panics on an error).
    pub fn apply_yaml(&mut self, yaml: &str) {
        self.lab_mut()
            .apply_yaml(yaml)
            .unwrap_or_else(|e| panic!("applying manifests: {e:#}"));
    }

    /// Merges `labels` into the labels of a Pod or Namespace.
    pub fn add_labels(
        &mut self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        labels: &[(&str, &str)],
    ) {
        let lab = self.lab_mut();
        let mut now = lab.labels(kind, namespace, name).expect("labels");
        now.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        lab.set_labels(kind, namespace, name, &now)
            .expect("setting labels");
    }

    /// Probes the truth table on one port and protocol once every agent has applied
    /// the manifests directory; panics with the observed table, the differences, the agents'
    /// explanation of each unexpected drop and their logs' tails when it differs from `expect`.
    pub fn check(&self, port: u16, proto: Proto, expect: &Expectations, what: &str) {
        let since = SystemTime::now();
        self.wait_applied();
        let lab = self.lab();
        let (matrix, diffs) = lab
            .probe_once(&truth_table_probe(port, proto), expect)
            .expect("probing");
        if diffs.is_empty() {
            return;
        }
        let mut logs = String::new();
        for d in diffs.iter().filter(|d| !d.observed) {
            for line in lab.explain_drop(&d.from, &d.to, since) {
                logs.push_str(&format!("{} -> {}: {line}\n", d.from, d.to.pod));
            }
        }
        for node in &lab.state().nodes {
            logs.push_str(&format!(
                "\n--- {} agent log (tail) ---\n{}\n",
                node.name,
                lab.agent_log(&node.name, 15)
            ));
        }
        panic!(
            "{what}: {port}/{proto} truth table differs once every agent applied the manifests\n\
             observed (. allowed, X denied, ! differs from expected):\n{}\n{}{logs}",
            matrix.render(Some(expect)),
            super::matrix::render_differences(&diffs),
        );
    }

    /// Asserts that every agent, having applied the manifests directory, logged each of `texts`
    /// (an agent logs a rejection before it reports the state applied).
    pub fn assert_agents_logged(&self, texts: &[&str]) {
        self.wait_applied();
        let lab = self.lab();
        let logs: Vec<String> = lab
            .state()
            .nodes
            .iter()
            .map(|n| lab.agent_log(&n.name, 100_000))
            .collect();
        assert!(
            logs.iter().all(|l| texts.iter().all(|t| l.contains(t))),
            "the agents' logs do not say {texts:?}:\n{}",
            logs.join("\n---\n")
        );
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        eprintln!(
            "case {} took {:.1} s",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}
