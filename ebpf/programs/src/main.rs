//! Weir's kernel programs: two static, map-driven tc classifiers on each pod's host-side veth.
//!
//! - `weir_from_pod` (tc ingress of the host-side veth): packets the pod sends; the endpoint is
//!   the source and its egress policy applies.
//! - `weir_to_pod` (tc egress of the host-side veth): packets delivered to the pod; the endpoint
//!   is the destination and its ingress policy applies.
//!
//! Both fail closed: anything that is not a verdict is `TC_ACT_SHOT`.
#![no_std]
#![no_main]

mod datapath;
mod fragments;
mod key;
mod maps;
mod parse;
mod policy;
mod report;

use aya_ebpf::{bindings::TC_ACT_SHOT, macros::classifier, programs::TcContext};
use weir_common::{DIR_EGRESS, DIR_INGRESS};

#[classifier]
pub fn weir_from_pod(ctx: TcContext) -> i32 {
    match datapath::run(&ctx, DIR_EGRESS) {
        Ok(v) => v,
        Err(_) => TC_ACT_SHOT as i32,
    }
}

#[classifier]
pub fn weir_to_pod(ctx: TcContext) -> i32 {
    match datapath::run(&ctx, DIR_INGRESS) {
        Ok(v) => v,
        Err(_) => TC_ACT_SHOT as i32,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
