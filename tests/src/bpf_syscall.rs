//! The raw `bpf(2)` call for what aya does not wrap: the benches' run-time statistics and live
//! XDP frames, and the maps of an earlier layout the upgrade test pins.

use std::io;

/// Calls `bpf(cmd, attr, size_of::<T>())`; `T` must be the `repr(C)` head of `union bpf_attr`
/// that `cmd` reads.
pub fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `repr(C)` head of `union bpf_attr` of the size passed; the kernel reads
    // (and for test runs and info queries writes) only that many bytes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
