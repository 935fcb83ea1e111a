//! CPU affinity for shard threads: one pinned thread per core.
//!
//! Owns nothing; keeps the invariant that a CPU index is checked against `CPU_SETSIZE`
//! before it touches a `cpu_set_t` (libc's `CPU_SET` would index out of bounds).

use std::io;

const CPU_SET_BITS: usize = libc::CPU_SETSIZE as usize;

/// Pin the calling thread to one CPU (`sched_setaffinity`).
///
/// Fails with `InvalidInput` when `cpu` is beyond `CPU_SETSIZE` and with the kernel's
/// `EINVAL` when the CPU does not exist or is outside this process's cpuset.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= CPU_SET_BITS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cpu {cpu} is beyond CPU_SETSIZE ({CPU_SET_BITS})"),
        ));
    }
    let mut set = empty_cpu_set();
    // Safety: `cpu < CPU_SETSIZE`, so CPU_SET writes inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // Safety: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs this thread may run on (`sched_getaffinity`), in ascending order.
pub fn available_cpus() -> io::Result<Vec<usize>> {
    let mut set = empty_cpu_set();
    // Safety: `set` is a valid, writable cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Safety: every index is below CPU_SETSIZE, so CPU_ISSET reads inside `set`.
    Ok((0..CPU_SET_BITS)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

fn empty_cpu_set() -> libc::cpu_set_t {
    // Safety: cpu_set_t is an array of integers; all zeroes is the empty set.
    unsafe { std::mem::zeroed() }
}
