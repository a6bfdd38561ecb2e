//! What a killed test process leaves (its namespaces, directories and pin directories, named
//! with its pid) is removed by the next test process, before its first namespace and its first
//! agent directories; what a running process owns stays. One test in this binary: the sweep runs
//! once per process.

use std::path::PathBuf;

use weir_tests::{
    agent::AgentDirs,
    netns::{self, Netns},
};

/// The pid of a process that has exited and been reaped.
fn gone_pid() -> u32 {
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("running true");
    let pid = child.id();
    child.wait().expect("waiting for true");
    pid
}

/// What a test process with `pid` made: a namespace, a state directory with a file, and a
/// directory in bpffs. Removed on drop, however the test ends.
struct MadeBy {
    netns: String,
    dirs: [PathBuf; 2],
}

impl MadeBy {
    fn new(pid: u32) -> Self {
        let netns = format!("wt-leftover-{pid}");
        netns::add(&netns).expect("creating the namespace");
        let state = std::env::temp_dir().join(format!("weir-test-leftover-{pid}"));
        std::fs::create_dir_all(state.join("state-node")).expect("creating the state directory");
        std::fs::write(state.join("node-agent.log"), "log").expect("writing the log");
        let pins = PathBuf::from(format!("/sys/fs/bpf/weir-test-leftover-{pid}"));
        std::fs::create_dir_all(pins.join("node")).expect("bpffs is mounted at /sys/fs/bpf");
        Self {
            netns,
            dirs: [state, pins],
        }
    }

    /// Which of them exist, by name.
    fn existing(&self) -> Vec<String> {
        let mut out = Vec::new();
        if netns::exists(&self.netns) {
            out.push(self.netns.clone());
        }
        for dir in &self.dirs {
            if dir.exists() {
                out.push(dir.display().to_string());
            }
        }
        out
    }
}

impl Drop for MadeBy {
    fn drop(&mut self) {
        netns::delete(&self.netns);
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn a_killed_test_processs_namespaces_and_directories_go_and_a_running_ones_stay() {
    let killed = MadeBy::new(gone_pid());
    let running = MadeBy::new(std::process::id());
    assert_eq!(killed.existing().len(), 3, "the leftovers were not made");

    // What any test does first.
    let _node = Netns::new("leftovers");
    let _dirs = AgentDirs::new("leftovers", "node");

    assert_eq!(
        killed.existing(),
        Vec::<String>::new(),
        "a killed test process's namespace or directories were left"
    );
    assert_eq!(
        running.existing().len(),
        3,
        "a running process's namespace or directories were removed: {:?}",
        running.existing()
    );
}
