//! The FFI edge: the few socket options that neither std, tokio nor nix expose.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// `SO_NETNS_COOKIE` from the kernel's asm-generic/socket.h (Linux 5.14+); the libc crate does
/// not export it for every architecture yet.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace a socket lives in: the same value that
/// `bpf_get_netns_cookie` returns in the kernel programs.
pub fn netns_cookie(sock: &impl AsFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the fd is open for the duration of the call (borrowed), and the out pointer and
    // length describe a live u64.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Hands glibc's free heap pages back to the kernel. The agent's Rust allocations go to
/// jemalloc (main.rs), which returns its own; RocksDB's C++ allocates through glibc, whose
/// malloc keeps what a burst freed in its per-thread arenas (measured when all of the agent
/// used it: 217 MiB resident, idle, after the benchmark's overload runs, against 23 MiB
/// before them). The agent calls this periodically.
pub fn release_free_heap() {
    // SAFETY: malloc_trim takes no pointers; it walks the allocator's own state under the
    // allocator's locks, so any thread may call it at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_cookie_of_a_socket_is_stable() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let ca = netns_cookie(&a).unwrap();
        assert_ne!(ca, 0);
        assert_eq!(ca, netns_cookie(&b).unwrap());
    }
}
