//! Reading verdict events from the `WEIR_EVENTS` ring buffer.

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use weir_common::VerdictEvent;

/// Reads events until the task is dropped, handing each to `sink`.
pub async fn read_events(
    ring: RingBuf<MapData>,
    mut sink: impl FnMut(VerdictEvent) + Send,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer, and
    // nothing else closes it.
    let mut fd = unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<VerdictEvent>() {
                // SAFETY: the kernel writes a whole VerdictEvent (repr(C), plain integers); the
                // ring buffer's data is not guaranteed aligned, hence read_unaligned.
                let event =
                    unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<VerdictEvent>()) };
                sink(event);
            }
        }
        guard.clear_ready();
    }
}
