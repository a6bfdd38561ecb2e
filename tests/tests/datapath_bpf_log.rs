//! Kernel-side debug logging (aya-log), through `BPF_PROG_TEST_RUN`: the object loaded with
//! logging on (as the agent loads it with `--bpf-log`) passes the verifier and writes a record
//! naming the verdict, reason and addresses of a drop into aya-log's ring buffer; loaded with
//! logging off (the default), the same drop writes nothing. Root only.

use std::sync::{Arc, Mutex};

use weir_agent::datapath::{loader, object::EBPF_OBJECT};
use weir_common::{
    DIR_INGRESS, PROG_FROM_POD, PROG_TO_POD, REASON_POLICY_DENIED, SUBJECT_ISOLATED_INGRESS,
    VERDICT_DROP,
};
use weir_tests::testrun::*;

/// A `log::Log` that keeps every record's text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<String>>>);

impl log::Log for Captured {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

/// A datapath with pods A and B, B isolated for ingress with no rule, loaded with logging
/// `on`; runs A's SYN to B through `weir_to_pod` (a drop) and returns what aya-log received.
fn drop_logged(on: bool) -> Vec<String> {
    let ebpf = loader::load_object(EBPF_OBJECT, None, on)
        .expect("loading the kernel object with logging set (the verifier's log is in the error)");
    let mut dp = Datapath { ebpf };
    dp.config(1, 0);
    for (pod, identity) in [(POD_A, ID_A), (POD_B, ID_B)] {
        dp.endpoint(pod, TEST_RUN_IFINDEX, identity);
        dp.ipcache(pod, 32, identity);
    }
    dp.subject(ID_B, 1, SUBJECT_ISOLATED_INGRESS);
    assert_eq!(dp.to_pod(&syn(POD_A, 40000, POD_B, 80)), SHOT);
    assert_eq!(dp.counter(REASON_POLICY_DENIED), 1);
    let captured = Captured::default();
    let mut logger = aya_log::EbpfLogger::init_with_logger(&mut dp.ebpf, captured.clone())
        .expect("the object has aya-log's ring buffer");
    logger.flush();
    captured.0.lock().unwrap().clone()
}

#[test]
fn with_logging_on_a_drop_is_logged_with_its_verdict_reason_and_addresses() {
    let records = drop_logged(true);
    let expected =
        format!("verdict {VERDICT_DROP} reason {REASON_POLICY_DENIED} direction {DIR_INGRESS}");
    let record = records
        .iter()
        .find(|r| r.starts_with(&expected))
        .unwrap_or_else(|| panic!("no record starting {expected:?} in {records:?}"));
    assert!(
        record.contains(&format!("::ffff:{POD_A}")) && record.contains(&format!("::ffff:{POD_B}")),
        "the record names both addresses: {record}"
    );
    assert!(record.contains("dport 80"), "{record}");
    assert!(
        record.contains(&format!("subject {ID_B} peer {ID_A}")),
        "{record}"
    );
}

#[test]
fn with_logging_off_nothing_is_logged() {
    assert_eq!(drop_logged(false), Vec::<String>::new());
}

#[test]
fn both_tc_programs_and_xdp_load_with_logging_on() {
    let ebpf = loader::load_object(EBPF_OBJECT, None, true).expect("loading with logging on");
    for name in [PROG_FROM_POD, PROG_TO_POD, weir_common::PROG_XDP] {
        assert!(ebpf.program(name).is_some(), "{name} is in the object");
    }
}
