//! Test support: private network namespaces for tests that need a network the
//! host does not have (a small MTU, a TUN device). Each runs on a thread of its
//! own that enters a new namespace; nothing of the host's network is touched,
//! and nothing routes between the two.
//!
//! Not here: anything the appliance itself runs.

use std::io::{self, Write as _};
use std::os::fd::AsRawFd as _;

/// Runs `f` on a thread of its own inside a new network namespace whose
/// loopback is up with an MTU of `mtu`. `None`, said on stderr as a `SKIP`,
/// where this process may not make one (not root); under CI that is a failure,
/// since CI runs as root.
pub(crate) fn in_private_netns<T: Send>(
    test: &str,
    mtu: i32,
    f: impl FnOnce() -> T + Send,
) -> Option<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare changes only this thread's namespaces; the
                // thread is ours and ends with the closure.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    let why = io::Error::last_os_error();
                    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
                    assert!(!ci, "{test}: no network namespace under CI ({why})");
                    let _ = writeln!(io::stderr(), "SKIP {test}: no network namespace ({why})");
                    return None;
                }
                set_loopback(mtu).expect("loopback up with the MTU");
                Some(f())
            })
            .join()
            .expect("netns thread")
    })
}

/// `lo` up, with `mtu`, in the calling thread's network namespace.
fn set_loopback(mtu: i32) -> io::Result<()> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let fd = socket.as_raw_fd();
    // SAFETY: an all-zero ifreq is valid; the ioctls read and write only it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo") {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_mtu = mtu;
    let ok = |r: libc::c_int| match r {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    };
    // SAFETY: as above; `req` outlives the calls.
    unsafe {
        ok(libc::ioctl(fd, libc::SIOCSIFMTU, &req))?;
        ok(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req))?;
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        ok(libc::ioctl(fd, libc::SIOCSIFFLAGS, &req))
    }
}
