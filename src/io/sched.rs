//! How the tunnels' threads are scheduled: `SCHED_BATCH`, no privileges needed.
//!
//! Forwarding is throughput work. Every wake-up of a tunnel's thread costs an
//! `epoll_wait` return and a context switch, however many datagrams the
//! `recvmmsg` after it then finds. Under Linux's default policy a thread woken
//! by a datagram preempts whatever runs on its CPU at once (often the process
//! that sent the datagram), so a busy sender's datagrams are handled a few at a
//! time. A `SCHED_BATCH` thread does not preempt on wake-up: when its CPU is
//! busy it waits for the running task's turn to end (at most one scheduler
//! slice, a few milliseconds), and finds a longer queue; on an idle CPU it runs
//! at once, as before. Its share of the CPU (nice value) is unchanged.
//!
//! Only the tunnels' runtime runs so (`wgplane run` sets it on each of that
//! runtime's threads as it starts): the admin API, the background tasks, the
//! management forwards and the TUN device's netlink connection keep the
//! default policy, because an API answer is a chain of wake-ups
//! (the request, the store's `fsync`, the tunnel's acknowledgement) that would
//! each wait a scheduler tick behind other work on a busy host.
//!
//! Leaves out real-time policies, CPU affinity and nice values: those need
//! privileges or a decision about the rest of the host.

/// Switches the calling thread, and every thread it creates from now on (they
/// inherit the policy), to `SCHED_BATCH`.
pub fn batch_scheduling() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is valid for the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    fn policy() -> i32 {
        // SAFETY: pid 0 is the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn the_thread_and_the_threads_it_creates_run_sched_batch() {
        // On a thread of its own, so the test harness's threads keep their policy.
        let (own, child) = std::thread::spawn(|| {
            assert_eq!(policy(), libc::SCHED_OTHER);
            super::batch_scheduling().expect("SCHED_BATCH needs no privileges");
            (policy(), std::thread::spawn(policy).join().unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(own, libc::SCHED_BATCH);
        assert_eq!(child, libc::SCHED_BATCH, "inherited");
        assert_eq!(policy(), libc::SCHED_OTHER, "other threads keep theirs");
    }
}
