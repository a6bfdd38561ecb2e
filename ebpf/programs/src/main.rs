#![no_std]
#![no_main]

use aya_ebpf::{bindings::TC_ACT_SHOT, macros::classifier, programs::TcContext};

#[classifier]
pub fn weir_from_pod(_ctx: TcContext) -> i32 {
    TC_ACT_SHOT
}

#[classifier]
pub fn weir_to_pod(_ctx: TcContext) -> i32 {
    TC_ACT_SHOT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
