//! Weir's kernel programs: two static, map-driven tc classifiers on each pod's host-side veth, and
//! an XDP early filter on the node's uplink.
//!
//! - `weir_from_pod` (tc ingress of the host-side veth): packets the pod sends; the endpoint is
//!   the source and its egress policy applies.
//! - `weir_to_pod` (tc egress of the host-side veth): packets delivered to the pod; the endpoint
//!   is the destination and its ingress policy applies.
//!
//! Both fail closed: anything that is not a verdict is `TC_ACT_SHOT`.
//!
//! - `weir_xdp` (XDP on the node's uplink): an early filter that drops, before an skb exists,
//!   what `weir_to_pod` would drop for a new connection, and the operator's deny list. It passes
//!   whatever it is not sure of: the tc programs stay the enforcers.
#![no_std]
#![no_main]

mod datapath;
mod debug_log;
mod fragments;
mod key;
mod maps;
mod packet;
mod parse;
mod policy;
mod redirect;
mod report;
mod throttle;
mod uplink;

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use weir_common::{DIR_EGRESS, DIR_INGRESS};

#[classifier]
pub fn weir_from_pod(ctx: TcContext) -> i32 {
    debug_log::begin();
    let verdict = match datapath::run(&ctx, DIR_EGRESS) {
        Ok(v) => v,
        Err(_) => TC_ACT_SHOT as i32,
    };
    debug_log::finish();
    verdict
}

#[classifier]
pub fn weir_to_pod(ctx: TcContext) -> i32 {
    debug_log::begin();
    let verdict = match datapath::run(&ctx, DIR_INGRESS) {
        Ok(v) => v,
        Err(_) => TC_ACT_SHOT as i32,
    };
    debug_log::finish();
    verdict
}

#[xdp]
pub fn weir_xdp(ctx: XdpContext) -> u32 {
    debug_log::begin();
    let verdict = uplink::run(&ctx);
    debug_log::finish();
    verdict
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
