//! The raw `bpf(2)` call for the bench passes that need commands aya does not wrap (run-time
//! statistics, live XDP frames).

use std::io;

/// Calls `bpf(cmd, attr, size_of::<T>())`; `T` must be the `repr(C)` head of `union bpf_attr`
/// that `cmd` reads.
pub(super) fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
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
